"""The bundled text splits, installed as the package ``edgeq.calibration_data`` (see setup.py and edgeq/resources.py)."""
