"""Read a .tflite file into the graph IR and write the IR back.

Reading memory-maps the file; weight buffers are numpy views on the map, so nothing is copied until a pass
changes a weight. Everything is validated before it is trusted, and the work done is bounded by the file
size, so a hostile file gets a `ModelError` quickly instead of a hang, a huge allocation or a traceback.

Writing packs everything but the weights with the flatbuffers builder, then appends the weight bytes after it
(16-byte aligned, straight from the input map) and patches the offsets of the Buffer tables to point at them.
Above 2 GiB the weights go after the flatbuffer in the large-model layout (Buffer.offset/size) instead.
"""
from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import struct
import tempfile
from pathlib import Path

import flatbuffers
import numpy as np

from . import schema
from .graph import Buffer, Model, OpCode, Operator, Quantization, SignatureDef, Subgraph, Tensor

FILE_IDENTIFIER = b"TFL3"
ALIGNMENT = 16
# A flatbuffer addresses at most 2 GiB; keep a margin for the tables themselves.
FLATBUFFER_LIMIT = 2**31 - 2**20
_PLACEHOLDER = 0x7FFFFFFF


class ModelError(Exception):
    """The file is not a valid TFLite model; the message says what and where."""


class PathError(Exception):
    """A path the run cannot use (missing, a folder, unwritable, or the same file as another); checked before
    any work."""


# ================================================================================================ paths
def _identity(path: Path):
    """What makes two paths the same file: device and inode when it exists (hard links, symlinks), else the
    resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


# Links into these are streams and devices (/dev/stdout → /proc/self/fd/1), never files to replace.
STREAM_FOLDERS = ("/dev/", "/proc/")


def _link_hops(path: Path) -> list[str]:
    """Where a chain of symbolic links at `path` leads, hop by hop (empty when `path` is no link)."""
    hops, seen, current = [], set(), str(path)
    while os.path.islink(current) and current not in seen:
        seen.add(current)
        current = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(current)), os.readlink(current)))
        hops.append(current)
    return hops


def write_target(path) -> Path:
    """The file that writing `path` replaces: the one a symbolic link leads to (the link stays a link, as for
    `cp`), else `path`."""
    path = Path(path)
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def check_paths(reads: dict, writes: dict) -> None:
    """Before any work: every file to read is an existing file; every file to write is a new or regular file
    in an existing folder we can create files in, and none of them is a file read or another file written.
    `reads`, `writes`: what the path is for (e.g. '--report') → path, or None when not given."""
    reads = {k: Path(v) for k, v in reads.items() if v is not None}
    writes = {k: Path(v) for k, v in writes.items() if v is not None}
    seen = {}
    for what, path in reads.items():
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise PathError(f"{what} {path}: {'no such file' if e.errno == errno.ENOENT else e.strerror or e}") \
                from None
        if stat.S_ISDIR(mode):
            raise PathError(f"{what} {path}: is a directory, not a file")
        if not stat.S_ISREG(mode):  # a pipe or a device: reading it could block forever or never end
            raise PathError(f"{what} {path}: is not a regular file")
        seen.setdefault(_identity(path), what)
    for what, path in writes.items():
        hops = _link_hops(path)
        stream = [h for h in hops if h.startswith(STREAM_FOLDERS)]
        if stream:
            raise PathError(f"{what} {path}: is a link to {stream[0]}, not to a file; give a file name")
        path = write_target(path)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:  # e.g. a name longer than the file system allows
            raise PathError(f"{what} {path}: {e.strerror or e}") from None
        if mode is not None and stat.S_ISDIR(mode):
            raise PathError(f"{what} {path}: is a directory; give a file name")
        if mode is not None and not stat.S_ISREG(mode):
            raise PathError(f"{what} {path}: exists and is not a regular file")
        same = seen.get(_identity(path))
        if same is not None:
            raise PathError(f"{what} {path} is the same file as the {same}; writing it would overwrite the "
                            f"{same}, choose another path")
        seen[_identity(path)] = what
        folder = path.parent
        if not folder.is_dir():
            raise PathError(f"{what} {path}: no such folder {folder}")
        try:  # the only check that holds for every user, file system and mount option
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise PathError(f"{what} {path}: cannot write into {folder} ({e.strerror or e})") from None


class Staged:
    """Files written under temporary names beside their targets and moved into place together by `commit`;
    whatever is not committed is removed on leaving the `with` block, so an error or Ctrl-C leaves nothing."""

    def __init__(self, committed: list | None = None):
        self.pending: list[tuple[Path, Path]] = []  # (temporary file, the path asked for)
        # The targets moved into place, in the caller's list when it gives one: what a Ctrl-C after the commit
        # leaves (complete files), for the caller to say.
        self.committed = committed if committed is not None else []

    def __enter__(self):
        return self

    def path(self, target) -> Path:
        """A fresh temporary file beside `target`, to be moved onto it by `commit`."""
        target, real = Path(target), write_target(target)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
        except OSError as e:
            raise PathError(f"{target}: cannot write ({e.strerror or e})") from None
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the report unreadable to others, unlike the model
        self.pending.append((Path(tmp), target))
        return Path(tmp)

    def commit(self, targets=None) -> None:
        """Move the staged files (or those for `targets`) into place, with Ctrl-C and SIGTERM held back until
        all moved and listed in `committed`, then delivered."""
        chosen = [(t, p) for t, p in self.pending if targets is None or p in [Path(x) for x in targets]]
        # A Ctrl-C or SIGTERM while the files move is held back, not raised at once: half the files would be in
        # place. Once they all are (and listed), it is raised again under the caller's handlers, which can then
        # say that the outputs are complete. (Python runs signal handlers in the main thread whichever thread
        # the signal hit, so a handler swap, unlike a signal mask, covers a process with BLAS or interpreter
        # threads.)
        held, received = {}, []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                held[sig] = signal.signal(sig, lambda signum, _: received.append(signum))
            except (ValueError, OSError):  # not the main thread: the caller owns the signals
                pass
        try:
            for tmp, target in chosen:  # all still there (a folder removed meanwhile): else none is moved
                if not tmp.is_file():
                    raise PathError(f"{target}: the finished file was removed before it could move into place (its "
                                    "folder or itself); nothing written")
            for tmp, target in chosen:
                try:
                    os.replace(tmp, write_target(target))  # a link's file, the link kept
                except OSError as e:  # removed in the instant between two moves
                    left = (f"{' and '.join(map(str, self.committed))} already in place" if self.committed
                            else "nothing written")
                    raise PathError(f"{target}: cannot move the finished file into place ({e.strerror or e}); "
                                    f"{left}") from None
                self.pending.remove((tmp, target))
                self.committed.append(target)
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])

    def __exit__(self, *exc):
        for tmp, _ in self.pending:
            try:
                tmp.unlink()
            except OSError:
                pass
        self.pending.clear()
        return False


# ================================================================================================ reading
def read(path: str | os.PathLike) -> Model:
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ModelError(f"{path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise ModelError(f"{path}: is a directory, not a .tflite file")
    if not stat.S_ISREG(mode):  # opening a pipe blocks until someone writes to it
        raise ModelError(f"{path}: is not a regular file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelError(f"{path}: empty file")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelError(f"{path}: {e.strerror or e}") from None
    return read_buffer(data, name=str(path), source=str(path.resolve()))


def read_buffer(data, name: str = "<buffer>", source: str | None = None) -> Model:
    """Parse a model held in `data` (bytes, mmap, ...); weight arrays are views on `data`.
    `source`: the file `data` maps, so that unchanged weights can be copied file to file on write."""
    reader = _Reader(data, name, source)
    try:
        return reader.model()
    except ModelError:
        raise
    except RecursionError:
        raise ModelError(f"{name}: nesting too deep, {reader.where}") from None
    except (struct.error, IndexError, ValueError, TypeError, OverflowError, UnicodeDecodeError,
            AttributeError, KeyError, MemoryError) as e:
        raise ModelError(f"{name}: malformed flatbuffer {reader.where} ({type(e).__name__}: {e})") from None


class _Reader:
    def __init__(self, data, name, source=None):
        self.data = data
        self.source = source
        self.name = name
        self.size = len(data)
        # Every table visit costs one unit; a valid file has at most one table per 4 bytes, so a file whose
        # vectors alias each other to multiply the work runs out of budget instead of hanging.
        self.budget = self.size // 4 + 1024
        self.where = "in the file header"

    def fail(self, message):
        raise ModelError(f"{self.name}: {message} ({self.where})")

    def spend(self, n=1):
        self.budget -= n
        if self.budget < 0:
            self.fail("more tables than the file can hold")

    def vector_length(self, n, elem_size=4):
        if n < 0 or n * elem_size > self.size:
            self.fail(f"vector of {n} entries does not fit in a {self.size}-byte file")
        self.spend(n)
        return n

    def index(self, i, n, what):
        i = int(i)
        if not 0 <= i < n:
            self.fail(f"{what} {i} is out of range [0, {n})")
        return i

    # ------------------------------------------------------------------------------------------------
    def model(self) -> Model:
        fb = self.root()
        buffers = self.buffers(fb)
        opcodes = self.opcodes(fb)
        n_subgraphs = self.vector_length(fb.SubgraphsLength())
        if n_subgraphs == 0:
            self.fail("model has no subgraphs")
        subgraphs = [self.subgraph(fb.Subgraphs(i), i, buffers, opcodes, n_subgraphs) for i in range(n_subgraphs)]
        desc = fb.Description()
        model = Model(subgraphs=subgraphs, version=fb.Version(),
                      description=desc.decode("utf-8") if desc is not None else None)
        self.metadata(fb, model, buffers)
        model.signature_defs = self.signature_defs(fb, subgraphs)
        model.external = self.external(fb)
        model.extra = _unmodelled_fields(schema.ModelT, _MODEL_EXTRA, fb)
        return model

    def root(self):
        """The Model table, after checking the header: size, identifier, root offset, schema version."""
        if self.size < 8:
            self.fail(f"only {self.size} bytes: too short for a TFLite model")
        if bytes(self.data[4:8]) != FILE_IDENTIFIER:
            self.fail(f"file identifier is {bytes(self.data[4:8])!r}, not {FILE_IDENTIFIER!r}: not a TFLite model")
        root = struct.unpack_from("<I", self.data, 0)[0]
        if root + 4 > self.size:
            self.fail(f"root table offset {root} is past the end of the file")
        fb = schema.Model.GetRootAs(self.data, 0)
        self.check_table(fb._tab.Pos)
        if fb.Version() != 3:
            self.fail(f"schema version {fb.Version()} is not supported (expected 3)")
        return fb

    def buffers(self, fb) -> list[Buffer]:
        self.where = "in the buffer table"
        buffers = [self.buffer(fb, i) for i in range(self.vector_length(fb.BuffersLength()))]
        if not buffers:
            self.fail("model has no buffers (buffer 0 must exist)")
        return buffers

    def opcodes(self, fb) -> list[OpCode]:
        self.where = "in the operator-code table"
        opcodes = []
        for i in range(self.vector_length(fb.OperatorCodesLength())):
            oc = fb.OperatorCodes(i)
            self.check_table(oc._tab.Pos)
            builtin = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            custom = oc.CustomCode()
            opcodes.append(OpCode(builtin, custom.decode("utf-8") if custom is not None else None, oc.Version()))
        return opcodes

    def metadata(self, fb, model: Model, buffers) -> None:
        self.where = "in the metadata"
        for i in range(self.vector_length(fb.MetadataLength())):
            m = fb.Metadata(i)
            self.check_table(m._tab.Pos)
            name = m.Name()
            model.metadata.append((name.decode("utf-8") if name is not None else "",
                                   buffers[self.index(m.Buffer(), len(buffers), f"metadata {i} buffer")]))
        if fb.MetadataBufferLength():
            mb = fb.MetadataBufferAsNumpy()
            model.metadata_buffer = [buffers[self.index(b, len(buffers), "metadata_buffer entry")] for b in mb]

    def signature_defs(self, fb, subgraphs) -> list[SignatureDef]:
        self.where = "in the signature defs"
        out = []
        for i in range(self.vector_length(fb.SignatureDefsLength())):
            sd = fb.SignatureDefs(i)
            self.check_table(sd._tab.Pos)
            sg = subgraphs[self.index(sd.SubgraphIndex(), len(subgraphs), f"signature {i} subgraph")]
            key = sd.SignatureKey()
            out.append(SignatureDef(
                key=key.decode("utf-8") if key is not None else "", subgraph=sg,
                inputs=self.tensor_maps(sd.InputsLength(), sd.Inputs, sg, i),
                outputs=self.tensor_maps(sd.OutputsLength(), sd.Outputs, sg, i)))
        return out

    def tensor_maps(self, n, get, sg: Subgraph, signature: int) -> list[tuple[str, Tensor]]:
        out = []
        for j in range(self.vector_length(n)):
            tm = get(j)
            self.check_table(tm._tab.Pos)
            t = sg.tensors[self.index(tm.TensorIndex(), len(sg.tensors), f"signature {signature} tensor")]
            out.append((tm.Name().decode("utf-8") if tm.Name() is not None else "", t))
        return out

    def external(self, fb):
        """External buffer groups and buffers, passed through as object-API values (or None)."""
        self.where = "in the external buffers"
        if not (fb.ExternalBufferGroupsLength() or fb.ExternalBuffersLength()):
            return None
        self.vector_length(fb.ExternalBufferGroupsLength())
        self.vector_length(fb.ExternalBuffersLength())
        return ([schema.ExternalBufferGroupT.InitFromObj(fb.ExternalBufferGroups(i))
                 for i in range(fb.ExternalBufferGroupsLength())],
                [schema.ExternalBufferT.InitFromObj(fb.ExternalBuffers(i))
                 for i in range(fb.ExternalBuffersLength())])

    def check_table(self, pos):
        """The table and its vtable lie inside the file."""
        self.spend()
        if not 0 <= pos <= self.size - 4:
            self.fail(f"table at offset {pos} is outside the file")
        vt = pos - struct.unpack_from("<i", self.data, pos)[0]
        if not 0 <= vt <= self.size - 4:
            self.fail(f"vtable of the table at offset {pos} is outside the file")
        vt_len, obj_len = struct.unpack_from("<HH", self.data, vt)
        if vt_len < 4 or vt + vt_len > self.size or pos + obj_len > self.size:
            self.fail(f"table at offset {pos} runs past the end of the file")

    def buffer(self, fb, i) -> Buffer:
        self.where = f"in buffer {i}"
        b = fb.Buffers(i)
        self.check_table(b._tab.Pos)
        offset, size = b.Offset(), b.Size()
        if offset > 1:  # large-model layout: the bytes follow the flatbuffer, addressed from the file start
            if offset + size > self.size:
                self.fail(f"data [{offset}, {offset + size}) lies past the end of the {self.size}-byte file")
            return Buffer(np.frombuffer(self.data, np.uint8, size, offset), self.source and (self.source, offset))
        n = b.DataLength()
        if n == 0:
            return Buffer(np.zeros(0, np.uint8))
        start = b._tab.Vector(4)
        if start + n > self.size:
            self.fail(f"data of {n} bytes at offset {start} runs past the end of the file")
        return Buffer(np.frombuffer(self.data, np.uint8, n, start), self.source and (self.source, start))

    def subgraph(self, fb, si, buffers, opcodes, n_subgraphs) -> Subgraph:
        self.where = f"in subgraph {si}"
        self.check_table(fb._tab.Pos)
        name = fb.Name()
        sg = Subgraph(name=name.decode("utf-8") if name is not None else None,
                      debug_metadata_index=fb.DebugMetadataIndex())
        for ti in range(self.vector_length(fb.TensorsLength())):
            self.where = f"in subgraph {si}, tensor {ti}"
            sg.tensors.append(self.tensor(fb.Tensors(ti), buffers))
        self.where = f"in subgraph {si}"
        sg.inputs = self.tensor_list(sg, self.int_vector(fb.InputsLength(), fb.InputsAsNumpy), "input tensor")
        sg.outputs = self.tensor_list(sg, self.int_vector(fb.OutputsLength(), fb.OutputsAsNumpy), "output tensor")
        self.quantization_references(sg)
        writers: dict[int, int] = {}  # id(tensor) → the operator writing it (LiteRT refuses a second, or a loop)
        for oi in range(self.vector_length(fb.OperatorsLength())):
            self.where = f"in subgraph {si}, operator {oi}"
            op = self.operator(fb.Operators(oi), sg, opcodes, n_subgraphs)
            for t in op.outputs:
                if t is None:
                    continue
                if any(u is t for u in op.inputs):
                    self.fail(f"tensor {t.name!r} is both an input and an output of the operator")
                if id(t) in writers:
                    self.fail(f"tensor {t.name!r} is written by operators {writers[id(t)]} and {oi}")
                writers[id(t)] = oi
            sg.operators.append(op)
        self.where = f"in subgraph {si}"
        sg.extra = _unmodelled_fields(schema.SubGraphT, _SUBGRAPH_EXTRA, fb)
        return sg

    def tensor_list(self, sg: Subgraph, vec, what, optional=False) -> list[Tensor | None]:
        out = []
        for j in vec:
            j = int(j)
            if optional and j == -1:
                out.append(None)
            else:
                out.append(sg.tensors[self.index(j, len(sg.tensors), what)])
        return out

    def quantization_references(self, sg: Subgraph) -> None:
        """Blockwise / multi-axis quantization name tensors by index: turn them into references."""
        n = len(sg.tensors)
        for t in sg.tensors:
            details = t.quantization.details if t.quantization is not None else None
            if isinstance(details, (getattr(schema, "BlockwiseQuantizationT", ()), getattr(schema, "MultiAxisQuantizationT", ()))):
                details.scales = sg.tensors[self.index(details.scales, n, "quantization scales tensor")]
                details.zeroPoints = (sg.tensors[self.index(details.zeroPoints, n, "quantization zero-point tensor")]
                                      if details.zeroPoints >= 0 else None)

    def operator(self, o, sg: Subgraph, opcodes, n_subgraphs) -> Operator:
        self.check_table(o._tab.Pos)
        opcode = opcodes[self.index(o.OpcodeIndex(), len(opcodes), "operator-code index")]
        op = Operator(
            opcode=opcode,
            inputs=self.tensor_list(sg, self.int_vector(o.InputsLength(), o.InputsAsNumpy), "input tensor", optional=True),
            outputs=self.tensor_list(sg, self.int_vector(o.OutputsLength(), o.OutputsAsNumpy), "output tensor", optional=True),
            intermediates=self.tensor_list(sg, self.int_vector(o.IntermediatesLength(), o.IntermediatesAsNumpy), "intermediate tensor"),
            custom_options_format=o.CustomOptionsFormat(),
            debug_metadata_index=o.DebugMetadataIndex(),
        )
        if any(t is None for t in op.outputs):
            self.fail("an operator output is -1")
        op.custom_options = self.custom_options(o)
        if o.MutatingVariableInputsLength():
            op.mutating_variable_inputs = [bool(x) for x in o.MutatingVariableInputsAsNumpy()]
        for n, (get_type, get_table, creator) in enumerate(((o.BuiltinOptionsType, o.BuiltinOptions, schema.BuiltinOptionsCreator),
                                                            (o.BuiltinOptions2Type, o.BuiltinOptions2, schema.BuiltinOptions2Creator))):
            table = get_table() if get_type() else None
            if table is not None:
                self.check_table(table.Pos)
                suffix = "2" if n else ""
                setattr(op, f"builtin_options{suffix}_type", get_type())
                setattr(op, f"builtin_options{suffix}", creator(get_type(), table))
        expected = _LAYER_OPTIONS.get(op.builtin)
        if expected is not None and op.builtin_options_type not in (schema.BuiltinOptions.NONE, expected):
            self.fail(f"a {op.name} operator with the options of another op type (builtin options type "
                      f"{op.builtin_options_type}, expected {expected})")
        for attr, value in _subgraph_references(op):
            for v in (value if isinstance(value, (list, tuple, np.ndarray)) else [value]):
                self.index(v, n_subgraphs, f"{attr} subgraph")
        op.extra = _unmodelled_fields(schema.OperatorT, _OPERATOR_EXTRA, o)
        return op

    def custom_options(self, o) -> bytes | None:
        """Inline custom options, or the large-model layout's (offset, size) region after the flatbuffer."""
        options = None
        if o.CustomOptionsLength():
            n = self.vector_length(o.CustomOptionsLength(), 1) and o.CustomOptionsLength()
            options = bytes(o.CustomOptionsAsNumpy()[:n])
        large_offset, large_size = o.LargeCustomOptionsOffset(), o.LargeCustomOptionsSize()
        if large_offset > 1:
            if large_offset + large_size > self.size:
                self.fail("large custom options lie past the end of the file")
            options = bytes(self.data[large_offset:large_offset + large_size])
        return options

    def int_vector(self, n, as_numpy):
        if not n:
            return []
        self.vector_length(n)
        return as_numpy()

    def tensor(self, fb, buffers) -> Tensor:
        self.check_table(fb._tab.Pos)
        shape = [int(d) for d in self.int_vector(fb.ShapeLength(), fb.ShapeAsNumpy)]
        name = fb.Name()
        t = Tensor(
            name=name.decode("utf-8", errors="replace") if name is not None else "",
            type=fb.Type(), shape=shape,
            shape_signature=[int(d) for d in fb.ShapeSignatureAsNumpy()] if fb.ShapeSignatureLength() else None,
            is_variable=fb.IsVariable(), has_rank=fb.HasRank(), external_buffer=fb.ExternalBuffer(),
        )
        bi = self.index(fb.Buffer(), len(buffers), "buffer index")
        if bi != 0:
            t.buffer = buffers[bi]
        q = fb.Quantization()
        if q is not None:
            self.check_table(q._tab.Pos)
            for n in (q.ScaleLength(), q.ZeroPointLength(), q.MinLength(), q.MaxLength()):
                self.vector_length(n)
            t.quantization = _quantization(schema.QuantizationParametersT.InitFromObj(q))
        s = fb.Sparsity()
        if s is not None:
            self.check_table(s._tab.Pos)
            self.vector_length(s.TraversalOrderLength())
            self.vector_length(s.BlockMapLength())
            self.vector_length(s.DimMetadataLength())
            t.sparsity = schema.SparsityParametersT.InitFromObj(s)
        if fb.VariantTensorsLength():
            self.vector_length(fb.VariantTensorsLength())
            t.variant_tensors = [schema.VariantSubTypeT.InitFromObj(fb.VariantTensors(i))
                                 for i in range(fb.VariantTensorsLength())]
        if t.is_constant and t.sparsity is None and t.dtype is not None:
            if any(d < 0 for d in shape):  # a constant's shape is static (LiteRT refuses the file)
                self.fail(f"constant tensor {t.name!r} has a negative dimension in its shape {shape}")
            expected = int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize
            if expected != t.buffer.nbytes:
                self.fail(f"tensor {t.name!r} of shape {shape} needs {expected} bytes, its buffer has {t.buffer.nbytes}")
        t.extra = _unmodelled_fields(schema.TensorT, _TENSOR_EXTRA, fb)
        return t


# The options table of each op the passes rewrite (LiteRT reads a table of another type as its own: a hostile file).
_LAYER_OPTIONS = {schema.BuiltinOperator.CONV_2D: schema.BuiltinOptions.Conv2DOptions,
                  schema.BuiltinOperator.DEPTHWISE_CONV_2D: schema.BuiltinOptions.DepthwiseConv2DOptions,
                  schema.BuiltinOperator.FULLY_CONNECTED: schema.BuiltinOptions.FullyConnectedOptions}


# Fields of the schema's Model, SubGraph, Operator and Tensor tables that the IR models itself (object-API
# names). Any other field (one a newer schema adds) is read into the IR object's `extra` dict and written back
# as it was, so a round trip never drops what this code does not know about yet.
_MODEL_MODELLED = {"version", "operatorCodes", "subgraphs", "description", "buffers", "metadataBuffer", "metadata",
                   "signatureDefs", "externalBufferGroups", "externalBuffers"}
_SUBGRAPH_MODELLED = {"tensors", "inputs", "outputs", "operators", "name", "debugMetadataIndex"}
_OPERATOR_MODELLED = {"opcodeIndex", "inputs", "outputs", "builtinOptionsType", "builtinOptions", "customOptions",
                      "customOptionsFormat", "mutatingVariableInputs", "intermediates", "largeCustomOptionsOffset",
                      "largeCustomOptionsSize", "builtinOptions2Type", "builtinOptions2", "debugMetadataIndex"}
_TENSOR_MODELLED = {"shape", "type", "buffer", "name", "quantization", "isVariable", "sparsity", "shapeSignature",
                    "hasRank", "variantTensors", "externalBuffer"}


_QUANTIZATION_MODELLED = {"min", "max", "scale", "zeroPoint", "detailsType", "details", "quantizedDimension"}


def _quantization(qt) -> Quantization:
    """The IR's Quantization of the schema's object-API value (every field as read, unknown ones in `extra`)."""
    return Quantization(scale=qt.scale, zero_point=qt.zeroPoint, axis=qt.quantizedDimension, min=qt.min,
                        max=qt.max, details=qt.details, details_type=qt.detailsType,
                        extra={k: v for k, v in vars(qt).items() if k not in _QUANTIZATION_MODELLED and v is not None})


def _quantization_t(q: Quantization, tindex: dict):
    """The schema's object-API value of an IR Quantization; tensors the details name become indices."""
    details = q.details
    if details is not None and isinstance(getattr(details, "scales", None), Tensor):
        details = schema.shallow_copy(details)
        details.scales = tindex[id(q.details.scales)]
        details.zeroPoints = tindex[id(q.details.zeroPoints)] if q.details.zeroPoints is not None else -1
    return _with_extra(schema.QuantizationParametersT(
        min=q.min, max=q.max, scale=q.scale, zeroPoint=q.zero_point, detailsType=q.details_type, details=details,
        quantizedDimension=q.axis), q.extra)


def _fields_beyond(t_class, modelled) -> tuple[str, ...]:
    return tuple(sorted(set(vars(t_class())) - modelled))


_MODEL_EXTRA = _fields_beyond(schema.ModelT, _MODEL_MODELLED)
_SUBGRAPH_EXTRA = _fields_beyond(schema.SubGraphT, _SUBGRAPH_MODELLED)
_OPERATOR_EXTRA = _fields_beyond(schema.OperatorT, _OPERATOR_MODELLED)
_TENSOR_EXTRA = _fields_beyond(schema.TensorT, _TENSOR_MODELLED)


def _unmodelled_fields(t_class, names: tuple[str, ...], table) -> dict:
    """The values of the fields `names` of a flatbuffer table (none with today's schema: then free)."""
    if not names:
        return {}
    full = t_class.InitFromObj(table)
    return {name: getattr(full, name) for name in names if getattr(full, name) is not None}


def _with_extra(t_object, extra: dict):
    for name, value in extra.items():
        setattr(t_object, name, value)
    return t_object


def _subgraph_references(op: Operator):
    """(attribute, value) pairs of every option field that names a subgraph by index."""
    for options in (op.builtin_options, op.builtin_options2):
        if options is None:
            continue
        for attr, value in vars(options).items():
            if attr.endswith(("SubgraphIndex", "SubgraphIndices")) or attr == "subgraph":
                yield attr, value


# ================================================================================================ writing
def write(model: Model, path: str | os.PathLike, large_layout: bool | None = None) -> int:
    """Write atomically (temp file in the target folder, then rename). Returns the file size.

    `large_layout`: None chooses by size; True forces weights after the flatbuffer (for tests).
    """
    path = write_target(path)
    header, chunks, size = _Packer(model).pack(large_layout)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    sources: dict[str, int] = {}
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            f.write(header)
            for prefix, buf in chunks:
                f.write(prefix)
                _write_data(f, buf, sources)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        for src in sources.values():
            os.close(src)
    return size


def _write_data(f, buf: Buffer, sources: dict) -> None:
    """Write one buffer's bytes: copied file to file in the kernel when they are an untouched region of the
    input (no page faults on the map, no user-space copy), else from memory."""
    if buf.source is not None and buf.nbytes >= 1 << 16 and hasattr(os, "copy_file_range"):
        path, offset = buf.source
        start, done = f.tell(), 0
        try:
            if path not in sources:
                sources[path] = os.open(path, os.O_RDONLY)
            while done < buf.nbytes:
                n = os.copy_file_range(sources[path], f.fileno(), buf.nbytes - done, offset + done)
                if n <= 0:
                    raise OSError("copy_file_range made no progress")
                done += n
            return
        except OSError:  # another file system, or a kernel without it: fall back to a plain write
            f.seek(start)
            f.truncate()
    data = buf.data
    f.write(memoryview(data).cast("B") if data.flags.c_contiguous else data.tobytes())


def to_bytes(model: Model, large_layout: bool | None = None) -> bytes:
    """The file as bytes (tests and in-memory use)."""
    header, chunks, _ = _Packer(model).pack(large_layout)
    out = bytearray(header)
    for prefix, buf in chunks:
        out += prefix
        out += buf.data.tobytes()
    return bytes(out)


class _Packer:
    """Turns the IR back into indices (buffers, operator codes, tensors, subgraphs) and packs the flatbuffer
    part of the file; the weights are laid out after it."""

    def __init__(self, model: Model):
        self.model = model
        self.buffers: list[Buffer] = []  # index 0 is the empty sentinel, not stored here
        self.buffer_index: dict[int, int] = {}
        self.opcodes: list[OpCode] = []
        self.opcode_index: dict[tuple, int] = {}
        self.large = False

    def buffer_of(self, buf: Buffer | None) -> int:
        if buf is None or buf.nbytes == 0:
            return 0
        i = self.buffer_index.get(id(buf))
        if i is None:
            self.buffers.append(buf)
            i = self.buffer_index[id(buf)] = len(self.buffers)
        return i

    def opcode_of(self, opcode: OpCode) -> int:
        key = opcode.key()
        i = self.opcode_index.get(key)
        if i is None:
            self.opcodes.append(opcode)
            i = self.opcode_index[key] = len(self.opcodes) - 1
        return i

    def pack(self, large_layout):
        """(header bytes, [(prefix, Buffer)], file size): the flatbuffer, then each weight after its prefix."""
        model = self.model
        # Subgraphs first: numbering their buffers and operator codes fills the two tables.
        subgraphs = [self.subgraph_t(sg) for sg in model.subgraphs]
        metadata = [schema.MetadataT(name=name, buffer=self.buffer_of(buf)) for name, buf in model.metadata]
        metadata_buffer = [self.buffer_of(b) for b in model.metadata_buffer]
        data_bytes = sum(b.nbytes + ALIGNMENT + 4 for b in self.buffers)
        self.large = bool(large_layout) if large_layout is not None else data_bytes > FLATBUFFER_LIMIT

        builder = flatbuffers.Builder(1024 + 256 * sum(len(sg.tensors) + len(sg.operators) for sg in model.subgraphs))
        op_codes = [schema.OperatorCodeT(deprecatedBuiltinCode=min(oc.builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES),
                                         customCode=oc.custom_code, version=oc.version, builtinCode=oc.builtin)
                    for oc in self.opcodes]
        offsets = {"operatorCodes": _vector_of_tables(builder, op_codes, schema.ModelStartOperatorCodesVector),
                   "subgraphs": _vector_of_tables(builder, subgraphs, schema.ModelStartSubgraphsVector)}
        if model.description is not None:
            offsets["description"] = builder.CreateString(model.description)
        buffer_tables = self.buffer_tables(builder)
        offsets["buffers"] = _vector_of_offsets(builder, buffer_tables, schema.ModelStartBuffersVector)
        if metadata_buffer:
            offsets["metadataBuffer"] = builder.CreateNumpyVector(np.array(metadata_buffer, np.int32))
        if metadata:
            offsets["metadata"] = _vector_of_tables(builder, metadata, schema.ModelStartMetadataVector)
        signature_defs = self.signature_defs_t()
        if signature_defs:
            offsets["signatureDefs"] = _vector_of_tables(builder, signature_defs, schema.ModelStartSignatureDefsVector)
        if model.external:
            offsets["externalBufferGroups"] = _vector_of_tables(builder, model.external[0], schema.ModelStartExternalBufferGroupsVector)
            offsets["externalBuffers"] = _vector_of_tables(builder, model.external[1], schema.ModelStartExternalBuffersVector)
        root = self.model_table(builder, offsets)
        builder.Finish(root, file_identifier=FILE_IDENTIFIER)
        header = bytearray(builder.Bytes[builder.Head():])
        total = len(header)
        header += b"\0" * ((-len(header)) % 4)
        chunks, size = self.layout_weights(header, total, buffer_tables)
        return bytes(header), chunks, size

    def signature_defs_t(self) -> list:
        sg_index = {id(sg): i for i, sg in enumerate(self.model.subgraphs)}
        out = []
        for sig in self.model.signature_defs:
            tindex = {id(t): i for i, t in enumerate(sig.subgraph.tensors)}
            out.append(schema.SignatureDefT(
                inputs=[schema.TensorMapT(name=n, tensorIndex=tindex[id(t)]) for n, t in sig.inputs],
                outputs=[schema.TensorMapT(name=n, tensorIndex=tindex[id(t)]) for n, t in sig.outputs],
                signatureKey=sig.key, subgraphIndex=sg_index[id(sig.subgraph)]))
        return out

    def buffer_tables(self, builder) -> list[int]:
        """Empty Buffer tables with a placeholder where the data offset goes, patched by `layout_weights`."""
        schema.BufferStart(builder)
        tables = [schema.BufferEnd(builder)]  # buffer 0: the empty sentinel
        for _ in self.buffers:
            schema.BufferStart(builder)
            if self.large:
                builder.PrependUint64Slot(2, _PLACEHOLDER, 0)  # size
                builder.PrependUint64Slot(1, _PLACEHOLDER, 0)  # offset
            else:
                builder.PrependUint32Slot(0, _PLACEHOLDER, 0)  # data (uoffset to the vector)
            tables.append(schema.BufferEnd(builder))
        return tables

    def model_table(self, builder, offsets: dict) -> int:
        """The root Model table from the packed parts (and any fields the IR does not model)."""
        extra = {name: _pack_model_field(builder, name, value) for name, value in self.model.extra.items()}
        schema.ModelStart(builder)
        schema.ModelAddVersion(builder, self.model.version)
        for field_name, adder in (("operatorCodes", schema.ModelAddOperatorCodes), ("subgraphs", schema.ModelAddSubgraphs),
                                  ("description", schema.ModelAddDescription), ("buffers", schema.ModelAddBuffers),
                                  ("metadataBuffer", schema.ModelAddMetadataBuffer), ("metadata", schema.ModelAddMetadata),
                                  ("signatureDefs", schema.ModelAddSignatureDefs),
                                  ("externalBufferGroups", schema.ModelAddExternalBufferGroups),
                                  ("externalBuffers", schema.ModelAddExternalBuffers)):
            if field_name in offsets:
                adder(builder, offsets[field_name])
        for name, value in extra.items():
            getattr(schema, "ModelAdd" + name[:1].upper() + name[1:])(builder, value)
        return schema.ModelEnd(builder)

    def layout_weights(self, header: bytearray, total: int, buffer_tables: list[int]):
        """Lay the weights out after the header and patch each Buffer table to point at them. Each buffer's
        prefix (alignment padding, plus the vector length inline) is returned so writers only copy bytes."""
        pos = len(header)
        chunks = []
        for i, buf in enumerate(self.buffers, start=1):
            table = total - buffer_tables[i]
            if self.large:
                prefix = b"\0" * ((-pos) % ALIGNMENT)
                pos += len(prefix)
                _patch_field(header, table, 1, "<Q", pos)
                _patch_field(header, table, 2, "<Q", buf.nbytes)
            else:
                vector_pos = pos + (-(pos + 4)) % ALIGNMENT
                prefix = b"\0" * (vector_pos - pos) + struct.pack("<I", buf.nbytes)
                field_pos = _field_position(header, table, 0)
                struct.pack_into("<I", header, field_pos, vector_pos - field_pos)
                pos += len(prefix)
            pos += buf.nbytes
            chunks.append((prefix, buf))
        if not self.large and pos > 2**31 - 1:
            raise ValueError("model exceeds 2 GiB; write it with the large-model layout")
        return chunks, pos

    def subgraph_t(self, sg: Subgraph):
        tindex = {id(t): i for i, t in enumerate(sg.tensors)}

        def idx(ts, optional=False):
            out = []
            for t in ts:
                if t is None:
                    if not optional:
                        raise ValueError("a required tensor reference is missing")
                    out.append(-1)
                    continue
                if id(t) not in tindex:
                    raise ValueError(f"tensor {t.name!r} is used but not listed in its subgraph")
                out.append(tindex[id(t)])
            return np.array(out, np.int32)

        return _with_extra(schema.SubGraphT(
            tensors=[self.tensor_t(t, tindex) for t in sg.tensors], inputs=idx(sg.inputs), outputs=idx(sg.outputs),
            operators=[self.operator_t(op, idx) for op in sg.operators],
            name=sg.name, debugMetadataIndex=sg.debug_metadata_index), sg.extra)

    def tensor_t(self, t: Tensor, tindex: dict):
        return _with_extra(schema.TensorT(
            shape=np.array(t.shape, np.int32), type=t.type, buffer=self.buffer_of(t.buffer), name=t.name,
            quantization=_quantization_t(t.quantization, tindex) if t.quantization is not None else None, isVariable=t.is_variable, sparsity=t.sparsity,
            shapeSignature=np.array(t.shape_signature, np.int32) if t.shape_signature is not None else None,
            hasRank=t.has_rank, variantTensors=t.variant_tensors, externalBuffer=t.external_buffer), t.extra)

    def operator_t(self, op: Operator, idx):
        return _with_extra(schema.OperatorT(
            opcodeIndex=self.opcode_of(op.opcode), inputs=idx(op.inputs, optional=True), outputs=idx(op.outputs),
            builtinOptionsType=op.builtin_options_type, builtinOptions=op.builtin_options,
            customOptions=np.frombuffer(op.custom_options, np.uint8) if op.custom_options is not None else None,
            customOptionsFormat=op.custom_options_format,
            mutatingVariableInputs=op.mutating_variable_inputs,
            intermediates=idx(op.intermediates) if op.intermediates else None,
            builtinOptions2Type=op.builtin_options2_type, builtinOptions2=op.builtin_options2,
            debugMetadataIndex=op.debug_metadata_index), op.extra)


def _pack_model_field(builder, name: str, value):
    """A Model field the IR does not model, packed before the Model table starts: tables, vectors of tables,
    strings and numeric vectors become offsets; scalars are passed through."""
    camel = name[:1].upper() + name[1:]
    if hasattr(value, "Pack"):
        return value.Pack(builder)
    if isinstance(value, (str, bytes)):
        return builder.CreateString(value)
    if isinstance(value, list) and value and hasattr(value[0], "Pack"):
        return _vector_of_tables(builder, value, getattr(schema, f"ModelStart{camel}Vector"))
    if isinstance(value, (list, np.ndarray)):
        return builder.CreateNumpyVector(np.asarray(value))
    return value


def _vector_of_tables(builder, objects, start_vector):
    return _vector_of_offsets(builder, [o.Pack(builder) for o in objects], start_vector)


def _vector_of_offsets(builder, offsets, start_vector):
    start_vector(builder, len(offsets))
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()


def _field_position(buf, table, field_index):
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vt_len = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * field_index
    if slot >= vt_len:
        raise AssertionError("placeholder field missing from its vtable")
    rel = struct.unpack_from("<H", buf, vtable + slot)[0]
    if rel == 0:
        raise AssertionError("placeholder field missing from its table")
    return table + rel


def _patch_field(buf, table, field_index, fmt, value):
    struct.pack_into(fmt, buf, _field_position(buf, table, field_index), value)


# ================================================================================ size estimate (no packing)
# Flatbuffer bytes around the data, measured on files this writer wrote (tests/test_size_guard.py checks the
# estimate against real files): a tensor table with its offset and shape vector, a buffer table with its
# offset, length prefix and average alignment padding, an operator table with its index vectors and options.
TENSOR_BYTES, BUFFER_BYTES, OPERATOR_BYTES, OPTIONS_BYTES, QUANTIZATION_BYTES = 24, 28, 28, 24, 28
# Per channel of a per-channel quantized tensor: a float32 scale and an int64 zero point.
CHANNEL_QUANTIZATION_BYTES = 4 + 8
# Per output channel of a full-integer layer quantized per channel: its int32 bias value, and the scale and zero
# point of its weight and again of its bias (beside the 1-byte weights).
FULL_INT8_CHANNEL_BYTES = 4 + 2 * CHANNEL_QUANTIZATION_BYTES


def tensor_bytes(t: Tensor) -> int:
    """Bytes of one tensor's table (not its data): name, shape, quantization and sparsity parameters."""
    n = TENSOR_BYTES + (len(t.name.encode("utf-8", "replace")) + 4) // 4 * 4 + 4 * len(t.shape)
    q = t.quantization
    if q is not None:
        n += QUANTIZATION_BYTES + 4 * len(q.scale if q.scale is not None else []) \
            + 8 * len(q.zero_point if q.zero_point is not None else [])  # CHANNEL_QUANTIZATION_BYTES each
    if t.sparsity is not None:
        n += 48 + sum(40 + sum(np.asarray(getattr(v, "values", None) if v is not None else [], ).nbytes
                                for v in (d.arraySegments, d.arrayIndices))
                      for d in (t.sparsity.dimMetadata or []))
    return n


def operator_bytes(op: Operator) -> int:
    return OPERATOR_BYTES + 4 * (len(op.inputs) + len(op.outputs)) + (OPTIONS_BYTES if op.builtin_options else 0)


def estimated_size(model: Model) -> int:
    """About the size `write` gives once unused operators and tensors are dropped, without packing anything:
    for comparing a model before and after one edit (a few bytes off per table, the same way both times)."""
    total, buffers = 256, {}
    for sg in model.subgraphs:
        total += _tables_bytes(*sg.live(model.signature_tensors(sg)), buffers)
    for _, buf in model.metadata:
        buffers[id(buf)] = buf.nbytes
    return total + sum(BUFFER_BYTES + n for n in buffers.values())


def added_size(operators: list[Operator], tensors: list[Tensor]) -> int:
    """What new `operators` and `tensors` (all live, on buffers no other tensor holds) add to `estimated_size`."""
    buffers = {}
    return _tables_bytes(operators, tensors, buffers) + sum(BUFFER_BYTES + n for n in buffers.values())


def _tables_bytes(operators, tensors, buffers: dict) -> int:
    """The tables of `operators` and `tensors`; their buffers (id → bytes) are added to `buffers`."""
    total = sum(operator_bytes(op) for op in operators)
    for t in tensors:
        total += tensor_bytes(t)
        if t.buffer is not None and t.buffer.nbytes:
            buffers[id(t.buffer)] = t.buffer.nbytes
    return total
