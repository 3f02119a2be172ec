"""The device profiles, installed as the package ``edgeq.export_profiles`` (see setup.py and edgeq/resources.py)."""
