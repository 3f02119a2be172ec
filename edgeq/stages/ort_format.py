"""Byte-stable ORT-format files: rewrite the part of ONNX Runtime's output whose layout varies from run to run.

Why: ONNX Runtime writes the kernel-type-string resolver's tables in the order of a hash map seeded per process, so
the same model converted twice can give different bytes with identical content, and no session option reaches that
map. This module keeps the bytes ONNX Runtime wrote for the model (the file's tail) and writes the resolver and
root table again in front of them, in a fixed order. How it was found (MiniLM: 5 hashes in 10 conversions) and the
evidence for the cause: see docs/decisions/ort-format.md.
"""

from __future__ import annotations

import struct

import flatbuffers
from onnxruntime.tools.ort_format_model import ort_flatbuffers_py  # noqa: F401  (puts the generated code on sys.path)
from ort_flatbuffers_py.fbs import (ArgTypeAndIndex, InferenceSession, KernelTypeStrArgsEntry, KernelTypeStrResolver,
                                    OpIdKernelTypeStrArgsEntry)

FILE_IDENTIFIER = b"ORTM"
# Alignment of the rewritten buffer's start. ORT's builder aligns to at most 8 (its largest scalar); 16 leaves room.
MIN_ALIGN = 16

Resolver = list[tuple[str, list[tuple[str, list[tuple[int, int]]]]]]  # op id -> kernel type str -> (arg type, index)


class OrtFormatError(ValueError):
    """The file does not have the layout this rewrite relies on (a different ONNX Runtime serializer)."""


def canonical_ort(data: bytes) -> memoryview:
    """The same ORT-format model with its resolver and root table written in a fixed order."""
    data = memoryview(data)  # slices without copies: a model's weights are most of the file
    session = _session(data)
    model = session.Model()
    if model is None or session.KernelTypeStrResolver() is None:
        raise OrtFormatError("no model or no kernel type string resolver")
    start = _model_start(data, model._tab.Pos)
    resolver = read_resolver(session)
    version_pos = _string_pos(session)
    resolver_pos = session.KernelTypeStrResolver()._tab.Pos
    # the rewrite keeps data[start:] verbatim; everything ORT wrote after the model must lie before it
    if not (resolver_pos < start <= version_pos and session._tab.Pos < start):
        raise OrtFormatError("the model is not the first thing in the file's tail")
    builder = flatbuffers.Builder(0)
    headroom = start + 1024  # what the resolver took before, plus the root: enough not to regrow the buffer
    builder.Bytes = bytearray(headroom + len(data) - start)
    builder.Bytes[headroom:] = data[start:]
    builder.head = headroom
    builder.minalign = MIN_ALIGN
    resolver_off = _write_resolver(builder, resolver)
    size = len(data)
    InferenceSession.Start(builder)
    InferenceSession.AddOrtVersion(builder, size - version_pos)  # offsets count from the buffer's end
    InferenceSession.AddModel(builder, size - model._tab.Pos)
    InferenceSession.AddKernelTypeStrResolver(builder, resolver_off)
    builder.Finish(InferenceSession.End(builder), file_identifier=FILE_IDENTIFIER)
    out = memoryview(builder.Bytes)[builder.Head():]
    check_same_content(data, out)
    return out


def read_resolver(session) -> Resolver:
    r = session.KernelTypeStrResolver()
    ops = []
    for i in range(r.OpKernelTypeStrArgsLength()):
        op = r.OpKernelTypeStrArgs(i)
        strs = []
        for j in range(op.KernelTypeStrArgsLength()):
            e = op.KernelTypeStrArgs(j)
            args = [(e.Args(k).ArgType(), e.Args(k).Index()) for k in range(e.ArgsLength())]
            strs.append((e.KernelTypeStr().decode(), args))
        ops.append((op.OpId().decode(), strs))
    return ops


def check_same_content(before: memoryview, after: memoryview) -> None:
    """The rewrite changed layout only: same version, same resolver entries, the same model bytes."""
    a, b = _session(before), _session(after)
    if a.OrtVersion() != b.OrtVersion() or read_resolver(a) != read_resolver(b):
        raise OrtFormatError("the rewritten file's version or resolver differs")
    if before[_model_start(before, a.Model()._tab.Pos):] != after[_model_start(after, b.Model()._tab.Pos):]:
        raise OrtFormatError("the rewritten file's model bytes differ")


def _session(data: memoryview):
    if len(data) < 8 or bytes(data[4:8]) != FILE_IDENTIFIER:
        raise OrtFormatError("not an ORT-format file (no ORTM identifier)")
    return InferenceSession.InferenceSession.GetRootAs(data, 0)


def _model_start(data: memoryview, model_pos: int) -> int:
    """Where the model's bytes begin: the Model table is the last thing its serializer writes, and its vtable, when
    not shared with an earlier table, is written just before it."""
    vtable_pos = model_pos - struct.unpack_from("<i", data, model_pos)[0]
    return min(model_pos, vtable_pos)


def _string_pos(session) -> int:
    o = session._tab.Offset(4)  # ort_version: field 0
    if not o:
        raise OrtFormatError("no ORT format version")
    return session._tab.Indirect(session._tab.Pos + o)


def _write_resolver(builder: flatbuffers.Builder, resolver: Resolver) -> int:
    """Entries in the order read (sorted by key: ORT wrote them with CreateVectorOfSortedTables), tables created in
    that order too."""
    op_offs = []
    for op_id, strs in resolver:
        str_offs = []
        for kernel_type_str, args in strs:
            arg_offs = []
            for arg_type, index in args:
                ArgTypeAndIndex.Start(builder)
                ArgTypeAndIndex.AddArgType(builder, arg_type)
                ArgTypeAndIndex.AddIndex(builder, index)
                arg_offs.append(ArgTypeAndIndex.End(builder))
            args_vec = _vector(builder, arg_offs)
            name = builder.CreateSharedString(kernel_type_str)
            KernelTypeStrArgsEntry.Start(builder)
            KernelTypeStrArgsEntry.AddKernelTypeStr(builder, name)
            KernelTypeStrArgsEntry.AddArgs(builder, args_vec)
            str_offs.append(KernelTypeStrArgsEntry.End(builder))
        op_name = builder.CreateString(op_id)
        strs_vec = _vector(builder, str_offs)
        OpIdKernelTypeStrArgsEntry.Start(builder)
        OpIdKernelTypeStrArgsEntry.AddOpId(builder, op_name)
        OpIdKernelTypeStrArgsEntry.AddKernelTypeStrArgs(builder, strs_vec)
        op_offs.append(OpIdKernelTypeStrArgsEntry.End(builder))
    ops_vec = _vector(builder, op_offs)
    KernelTypeStrResolver.Start(builder)
    KernelTypeStrResolver.AddOpKernelTypeStrArgs(builder, ops_vec)
    return KernelTypeStrResolver.End(builder)


def _vector(builder: flatbuffers.Builder, offsets: list[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()
