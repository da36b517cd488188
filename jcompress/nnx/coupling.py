"""Which unit dimensions of an NNX model are coupled, found by tracing its forward pass.

**Which dimensions are coupled** is read from the model's forward pass, not from its
class. The model is traced with ``jax.make_jaxpr`` (every leaf of its state an input,
eval mode, a batch of two examples of ``input_shape``) and each axis of each
intermediate array gets a node; the operations join nodes that index the same units:

- elementwise ops and activations, bias adds, per-channel norm parameters and statistics
  (BatchNorm ``scale``, ``bias``, ``mean``, ``var``): the same axis of every operand;
- a Dense or conv layer: its input axis with its kernel's input rows (``kernel[..., i, :]``),
  its kernel's last axis with its output axis;
- residual adds: both branches, so every layer writing into the stream is in one group;
- transposes, broadcasts, pooling over other axes, reshapes: a flatten of ``(h, w, c)``
  makes the Dense rows a strided copy of the channels (row ``(i * w + j) * c + k``
  belongs to channel ``k``);
- concatenation along the units' axis: each part keeps its own units (Inception or
  DenseNet branches), the consumer's rows are split accordingly;
- query and key projections contracted together (attention) join one group.

A **group** is the set of nodes joined to the output axis of one or more kernels; its
units can be removed only together, from every kernel writing it (as the dependency graph
of Torch-Pruning does for PyTorch): unit ``j`` goes when column ``j`` is removed in every
one of them. A group cannot be pruned when the tracer cannot tell how an op uses its units:
a reduction over them (a LayerNorm or softmax over the features, a mean over channels),
the model's outputs or inputs, a grouped convolution, a slice, a gather (an embedding
lookup) or any op the tracer does not know. :func:`coupling` lists the groups with the reason of each.

**Declaring units** (the fallback where tracing cannot decide). A module may define
``coupled_units(self) -> list[dict[str, int]]``: each dict maps leaf names relative to
that module to the axis that indexes one group's units, e.g. ``[{'up/kernel': -1,
'up/bias': 0, 'down/kernel': -2}]``. The listed axes are joined into one group, which is
prunable whatever the tracer found on the way (the author vouches for it).

The trace itself (the jaxpr, the axis nodes of every leaf, every contraction with its
FLOPs) is what :mod:`jcompress.nnx.surgery` plans and builds the smaller model from.

Example:
  >>> [(g.layer, g.size, g.reason) for g in coupling(model, input_shape=(28, 28, 1))]
  [('fc1', 300, None), ('fc2', 100, None), ('fc3', 10, "reach the model's output")]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree
from jcompress.core import spec as spec_lib

__all__ = ["UnitGroup", "coupling"]

# fmt: off
_ELEMENTWISE = frozenset([
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "clamp",
    "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma", "div", "eq", "erf", "erf_inv",
    "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag", "integer_pow", "is_finite", "le", "lgamma", "log",
    "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square",
    "stop_gradient", "sub", "tan", "tanh", "xor",
])
_SHAPE_OPS = frozenset(["reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "rev"])
_REDUCTIONS = frozenset([
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin",
])
_CALLS = frozenset([
    "pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
    "remat", "checkpoint",
])
# fmt: on


# ----------------------------------------------------------------------------------------
# Axis nodes: a union-find whose classes are sets of axes indexing the same units
# ----------------------------------------------------------------------------------------


class _Nodes:
    """Union-find over array axes. A class may be *composite*: a row-major product of other
    classes (a flattened axis), or a *concatenation* of other classes; a class may be
    *poisoned* with the reason it cannot be pruned."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.parts: dict[int, tuple[int, ...]] = {}
        self.concats: dict[int, tuple[int, ...]] = {}
        self.reasons: dict[int, str] = {}

    def new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        n = len(self.parent) - 1
        if reason is not None:
            self.reasons[n] = reason
        return n

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def atoms(self, a: int) -> list[int]:
        """The non-composite classes a node is the row-major product of (itself if atomic)."""
        r = self.find(a)
        if r not in self.parts:
            return [r]
        return [x for p in self.parts[r] for x in self.atoms(p)]

    def reach(self, a: int) -> set[int]:
        """The classes without structure that a node is built from (through products and concatenations)."""
        r = self.find(a)
        sub = self.parts.get(r) or self.concats.get(r)
        return {r} if sub is None else {x for p in sub for x in self.reach(p)}

    def unit_index(self, a: int, g: int) -> np.ndarray | None:
        """For each entry of node ``a``, the unit of class ``g`` it belongs to (-1: none); None if unrelated."""
        r = self.find(a)
        if r == g:
            return np.arange(self.size[r])
        if r in self.parts:
            subs = [self.unit_index(p, g) for p in self.parts[r]]
            if all(x is None for x in subs):
                return None
            sizes = [self.size[self.find(p)] for p in self.parts[r]]
            coords = np.unravel_index(np.arange(math.prod(sizes)), sizes)
            out = np.full(math.prod(sizes), -1)
            for pos, sub in enumerate(subs):
                if sub is not None:
                    out = np.where(sub[coords[pos]] >= 0, sub[coords[pos]], out)
            return out
        if r in self.concats:
            subs = [self.unit_index(p, g) for p in self.concats[r]]
            if all(x is None for x in subs):
                return None
            return np.concatenate(
                [
                    sub if sub is not None else np.full(self.size[self.find(p)], -1)
                    for p, sub in zip(self.concats[r], subs)
                ]
            )
        return None

    def composite(self, nodes: Sequence[int]) -> int:
        """A node for the row-major flattening of ``nodes`` (size-1 axes dropped)."""
        nodes = [n for n in nodes if self.size[n] != 1]
        if len(nodes) == 1:
            return nodes[0]
        n = self.new(math.prod(self.size[x] for x in nodes))
        if nodes:
            self.parts[n] = tuple(nodes)
        return n

    def concat(self, nodes: Sequence[int]) -> int:
        """A node for the concatenation of ``nodes``."""
        n = self.new(sum(self.size[x] for x in nodes))
        self.concats[n] = tuple(nodes)
        return n

    def poison(self, a: int, reason: str) -> None:
        self.reasons.setdefault(self.find(a), reason)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        pa, pb = self.parts.get(ra), self.parts.get(rb)
        ca, cb = self.concats.get(ra), self.concats.get(rb)
        self.parent[rb] = ra
        if rb in self.reasons:
            self.reasons.setdefault(ra, self.reasons.pop(rb))
        if pa is None and ca is None:
            if pb is not None:
                self.parts[ra] = pb
            if cb is not None:
                self.concats[ra] = cb
        elif pa is not None and pb is not None:
            xa = [x for p in pa for x in self.atoms(p)]
            xb = [x for p in pb for x in self.atoms(p)]
            if [self.size[x] for x in xa] == [self.size[x] for x in xb]:
                for x, y in zip(xa, xb):
                    self.union(x, y)
            else:
                self.poison(ra, "are reshaped in two ways the tracer cannot reconcile")
        elif ca is not None and cb is not None:
            if [self.size[self.find(x)] for x in ca] == [self.size[self.find(x)] for x in cb]:
                for x, y in zip(ca, cb):
                    self.union(x, y)
            else:
                self.poison(ra, "are concatenated in two ways the tracer cannot reconcile")
        elif pb is not None or cb is not None:
            self.poison(ra, "are both reshaped and concatenated, which the tracer cannot reconcile")


class _Contraction(NamedTuple):
    """A dot_general or convolution seen while tracing, with its operands' axis nodes."""

    lhs: tuple
    rhs: tuple
    lhs_axes: tuple  # contracted axes of the lhs
    rhs_axes: tuple
    kernel: str | None  # the leaf a weight operand comes from (lhs or rhs), if any
    bias: str | None  # the 1-D leaf added to the output right after, if any
    out_feature_axis: int
    flops: int  # 2 * multiply-adds, for the traced batch


class _Trace(NamedTuple):
    jaxpr: Any
    consts: list
    names: list[str]  # state leaf names, in the order of the jaxpr's first invars
    param_names: set  # the names of the nnx.Param leaves among them
    graphdef: Any
    state: Any  # the nnx State the names index
    nodes: _Nodes
    leaf_nodes: dict  # (leaf name, axis) -> node
    contractions: list[_Contraction]
    declared: set  # roots declared prunable by a module


def _inner(eqn):
    for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(k)
        if isinstance(j, jcore.ClosedJaxpr):
            return j.jaxpr, j.consts
        if isinstance(j, jcore.Jaxpr):
            return j, []
    return None


def _shape(v) -> tuple:
    return tuple(getattr(v.aval, "shape", ()))


class _Tracer:
    """Walks a jaxpr and joins the axis nodes as the module docstring describes."""

    def __init__(self, nodes: _Nodes):
        self.n = nodes
        self.contractions: list[_Contraction] = []

    def fresh(self, v, reason=None) -> tuple:
        return tuple(self.n.new(d, reason) for d in _shape(v))

    def run(self, jaxpr, consts_nodes, in_nodes, src_in) -> list:
        env: dict = {}
        src: dict = {}  # var -> leaf name, for vars that are a leaf up to shape ops
        made_by: dict = {}  # var -> index of the contraction producing it
        for v, nd in zip(jaxpr.constvars, consts_nodes):
            env[v] = nd
        for v, nd, s in zip(jaxpr.invars, in_nodes, src_in):
            env[v] = nd
            if s is not None:
                src[v] = s

        def get(v):
            return () if isinstance(v, jcore.Literal) else env[v]

        def source(v):
            return None if isinstance(v, jcore.Literal) else src.get(v)

        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            ins = [get(v) for v in eqn.invars]
            outs = [self.fresh(v) for v in eqn.outvars]
            inner = _inner(eqn) if name in _CALLS else None
            if inner is not None:
                jx, cs = inner
                got = self.run(jx, [self.fresh_const(c) for c in cs], ins, [source(v) for v in eqn.invars])
                for o, g in zip(outs, got):
                    self.join(o, g)
            elif name in _ELEMENTWISE:
                out = outs[0]
                for x, v in zip(ins, eqn.invars):
                    if not x:
                        continue
                    shp, oshp = _shape(v), _shape(eqn.outvars[0])
                    off = len(oshp) - len(shp)
                    for k, d in enumerate(shp):
                        if d == oshp[off + k]:
                            self.n.union(x[k], out[off + k])
                if name == "add" and not any(isinstance(v, jcore.Literal) for v in eqn.invars):
                    a, b = eqn.invars
                    for p, q in ((a, b), (b, a)):
                        if p in made_by and q in src and len(_shape(q)) >= 1:
                            c = self.contractions[made_by[p]]
                            if c.bias is None and math.prod(_shape(q)) == _shape(p)[c.out_feature_axis]:
                                self.contractions[made_by[p]] = c._replace(bias=src[q])
                            made_by[eqn.outvars[0]] = made_by[p]
                if name in ("convert_element_type", "copy", "copy_p") and source(eqn.invars[0]):
                    src[eqn.outvars[0]] = source(eqn.invars[0])
            elif name in _SHAPE_OPS:
                self.shape_op(eqn, ins[0], outs[0])
                if source(eqn.invars[0]):
                    src[eqn.outvars[0]] = source(eqn.invars[0])
            elif name in _REDUCTIONS:
                axes = tuple(eqn.params["axes"])
                kept = [k for k in range(len(ins[0])) if k not in axes]
                for k in axes:
                    self.n.poison(ins[0][k], f"are reduced over by {name} (a norm, softmax or mean over them)")
                for k, o in zip(kept, outs[0]):
                    self.n.union(ins[0][k], o)
            elif name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
                ax = eqn.params["axis"]
                for k, (x, o) in enumerate(zip(ins[0], outs[0])):
                    if k == ax:
                        self.n.poison(x, f"are accumulated over by {name}")
                        self.n.poison(o, f"are accumulated over by {name}")
                    else:
                        self.n.union(x, o)
            elif name.startswith("reduce_window"):
                self.pool(eqn, ins, outs)
            elif name == "dot_general":
                self.dot(eqn, ins, outs, src, made_by)
            elif name == "conv_general_dilated":
                self.conv(eqn, ins, outs, src, made_by)
            elif name == "pad":
                cfg = eqn.params["padding_config"]
                for k, (x, o) in enumerate(zip(ins[0], outs[0])):
                    if tuple(cfg[k]) == (0, 0, 0):
                        self.n.union(x, o)
                    else:
                        self.n.poison(x, "are padded by pad")
            elif name == "concatenate":
                ax = eqn.params["dimension"]
                for x in ins:
                    for k, (a, o) in enumerate(zip(x, outs[0])):
                        if k != ax:
                            self.n.union(a, o)
                self.n.union(outs[0][ax], self.n.concat([x[ax] for x in ins]))
            elif name == "slice":
                shp = _shape(eqn.invars[0])
                st = eqn.params.get("strides") or (1,) * len(shp)
                for k, (x, o) in enumerate(zip(ins[0], outs[0])):
                    whole = eqn.params["start_indices"][k] == 0 and eqn.params["limit_indices"][k] == shp[k]
                    if whole and st[k] == 1:
                        self.n.union(x, o)
                    else:
                        self.n.poison(x, "are sliced")
                        self.n.poison(o, "are sliced")
            else:
                for x in ins + outs:
                    for node in x:
                        self.n.poison(node, f"pass through {name}, an op the tracer does not follow")
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [get(v) for v in jaxpr.outvars]

    def fresh_const(self, c) -> tuple:
        return tuple(self.n.new(d, "are combined with a constant array of the forward pass") for d in np.shape(c))

    def join(self, a, b) -> None:
        for x, y in zip(a, b):
            self.n.union(x, y)

    def shape_op(self, eqn, x, out) -> None:
        name = eqn.primitive.name
        ishp, oshp = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        if name == "transpose":
            for k, p in enumerate(eqn.params["permutation"]):
                self.n.union(x[p], out[k])
        elif name == "broadcast_in_dim":
            for k, d in enumerate(eqn.params["broadcast_dimensions"]):
                if ishp[k] == oshp[d]:
                    self.n.union(x[k], out[d])
        elif name == "rev":
            for k, (a, b) in enumerate(zip(x, out)):
                if k in eqn.params["dimensions"]:
                    self.n.poison(a, "are reversed")
                else:
                    self.n.union(a, b)
        else:  # reshape, squeeze, expand_dims: match runs of axes with equal products
            self.reshape(ishp, oshp, x, out)

    def reshape(self, ishp, oshp, x, out) -> None:
        if 0 in ishp:
            return
        i = j = 0
        while i < len(ishp) or j < len(oshp):
            ai, aj = [i], [j]
            if i >= len(ishp):
                j += 1
                continue
            if j >= len(oshp):
                i += 1
                continue
            pi, pj = ishp[i], oshp[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    pi *= ishp[i]
                    ai.append(i)
                    i += 1
                else:
                    pj *= oshp[j]
                    aj.append(j)
                    j += 1
            a = self.n.composite([x[k] for k in ai])
            b = self.n.composite([out[k] for k in aj])
            self.n.union(b, a)

    def pool(self, eqn, ins, outs) -> None:
        p = eqn.params
        x, out = ins[0], outs[0]
        for k in range(len(x)):
            trivial = (
                p["window_dimensions"][k] == 1
                and p["window_strides"][k] == 1
                and tuple(p["padding"][k]) == (0, 0)
                and p.get("base_dilation", (1,) * len(x))[k] == 1
            )
            if trivial:
                self.n.union(x[k], out[k])
            else:
                self.n.poison(x[k], f"are pooled over by {eqn.primitive.name}")

    def _record(self, eqn, lhs, rhs, la, ra, src, made_by, feature_axis, macs_per_output) -> None:
        a, b = eqn.invars[:2]
        known = lambda v: None if isinstance(v, jcore.Literal) else src.get(v)
        kernel = known(b) or known(a)
        flops = 2 * math.prod(_shape(eqn.outvars[0])) * int(macs_per_output)
        self.contractions.append(
            _Contraction(tuple(lhs), tuple(rhs), tuple(la), tuple(ra), kernel, None, feature_axis, flops)
        )
        made_by[eqn.outvars[0]] = len(self.contractions) - 1

    def dot(self, eqn, ins, outs, src, made_by) -> None:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        out = outs[0]
        for a, b in zip(lc, rc):
            self.n.union(lhs[a], rhs[b])
        k = 0
        for a, b in zip(lb, rb):
            self.n.union(lhs[a], rhs[b])
            self.n.union(lhs[a], out[k])
            k += 1
        for a in range(len(lhs)):
            if a not in lc and a not in lb:
                self.n.union(lhs[a], out[k])
                k += 1
        for b in range(len(rhs)):
            if b not in rc and b not in rb:
                self.n.union(rhs[b], out[k])
                k += 1
        lshape = _shape(eqn.invars[0])
        self._record(eqn, lhs, rhs, lc, rc, src, made_by, len(out) - 1, math.prod(lshape[a] for a in lc))

    def conv(self, eqn, ins, outs, src, made_by) -> None:
        dn = eqn.params["dimension_numbers"]
        (lb, lf, *_), (ro, ri, *_), (ob, of, *_) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        lhs, rhs = ins
        out = outs[0]
        groups = eqn.params["feature_group_count"] * eqn.params["batch_group_count"]
        self.n.union(lhs[lb], out[ob])
        self.n.union(rhs[ro], out[of])
        if groups == 1:
            self.n.union(lhs[lf], rhs[ri])
        elif self.n.size[rhs[ri]] == 1 and self.n.size[lhs[lf]] == self.n.size[out[of]] == groups:
            self.n.union(lhs[lf], out[of])  # depthwise, one filter per channel
        else:
            for node in (lhs[lf], rhs[ri], out[of]):
                self.n.poison(node, "are mixed by a grouped convolution")
        rshape = _shape(eqn.invars[1])
        self._record(eqn, lhs, rhs, (lf,), (ri,), src, made_by, of, math.prod(rshape) // max(rshape[ro], 1))


def _trace(model: nnx.Module, input_shape: Sequence[int], dtype) -> _Trace:
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    named = tree.named_leaves(pure)
    names = [n for n, _ in named]
    treedef = jax.tree.structure(pure)

    def forward(leaves, x):
        m = nnx.merge(graphdef, tree.from_pure_dict(state, jax.tree.unflatten(treedef, leaves)))
        m.eval()
        return m(x)

    x = jax.ShapeDtypeStruct((2, *[int(d) for d in input_shape]), dtype)
    abstract = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for _, v in named]
    try:
        closed = jax.make_jaxpr(forward)(abstract, x)
    except Exception as e:  # a wrong input_shape is the usual cause
        raise ValueError(f"tracing the model on inputs of shape {(2, *input_shape)} failed: {e}") from e
    nodes = _Nodes()
    leaf_nodes = {}
    in_nodes, srcs = [], []
    for name, v in named:
        axes = tuple(nodes.new(d) for d in jnp.shape(v))
        leaf_nodes.update({(name, k): a for k, a in enumerate(axes)})
        in_nodes.append(axes)
        srcs.append(name)
    in_nodes.append(tuple(nodes.new(d, "are tied to an axis of the model's input") for d in x.shape))
    srcs.append(None)
    tracer = _Tracer(nodes)
    outs = tracer.run(closed.jaxpr, [tracer.fresh_const(c) for c in closed.consts], in_nodes, srcs)
    for o in outs:
        for node in o:
            nodes.poison(node, "reach the model's output")
    declared = set()
    for path, module in nnx.iter_graph(model):
        decl = getattr(type(module), "coupled_units", None)
        if decl is None or not isinstance(module, nnx.Module):
            continue
        prefix = "/".join(str(p) for p in path)
        for group in module.coupled_units():
            members = []
            for leaf, axis in group.items():
                full = f"{prefix}/{leaf}" if prefix else leaf
                if full not in names:
                    raise ValueError(f"{type(module).__name__}.coupled_units names {leaf!r}, which is not a leaf of it")
                members.append(leaf_nodes[(full, axis % len(jnp.shape(dict(named)[full])))])
            for m in members[1:]:
                nodes.union(members[0], m)
            declared.add(nodes.find(members[0]))
    # a poisoned flattened or concatenated axis poisons its parts; declared groups are trusted
    changed = True
    while changed:
        changed = False
        for r in [*nodes.parts, *nodes.concats]:
            if nodes.find(r) != r or r not in nodes.reasons:
                continue
            for a in nodes.reach(r):
                if a not in nodes.reasons and a not in declared:
                    nodes.reasons[a] = nodes.reasons[r]
                    changed = True
    declared = {nodes.find(d) for d in declared}
    for d in declared:
        nodes.reasons.pop(d, None)
    param_names = {n for n, _ in tree.named_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    return _Trace(
        closed.jaxpr,
        closed.consts,
        names,
        param_names,
        graphdef,
        state,
        nodes,
        leaf_nodes,
        tracer.contractions,
        declared,
    )


# ----------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------


class UnitGroup(NamedTuple):
    """Output units of one or more layers that can only be removed together.

    Attributes:
      layer: the name of the group, its first producer's layer (``'fc1'``).
      producers: the kernel leaves whose last axis holds the units (``('fc1/kernel',)``;
        several for a residual stream).
      size: the number of units.
      members: ``(leaf name, axis, unit_of)`` for every leaf axis indexed by the units:
        entry ``i`` of the axis belongs to unit ``unit_of[i]`` (an int array; -1 for the
        entries of other units, e.g. the other channels concatenated with these). For the
        rows of a Dense layer after a flatten of ``(h, w, c)``, ``unit_of[i] = i % c``.
      reason: why the units cannot be removed, or None when they can.
    """

    layer: str
    producers: tuple
    size: int
    members: tuple
    reason: str | None


def _groups(tr: _Trace) -> list[UnitGroup]:
    n = tr.nodes
    shapes = {name: jnp.shape(v) for name, v in tree.named_leaves(nnx.to_pure_dict(tr.state))}
    by_root: dict[int, list[str]] = {}
    for k in tr.names:
        if k in tr.param_names and len(shapes[k]) >= 2 and tree.default_selection(k, np.empty(shapes[k], bool)):
            by_root.setdefault(n.find(tr.leaf_nodes[(k, len(shapes[k]) - 1)]), []).append(k)
    members: dict[int, list] = {r: [] for r in by_root}
    for (leaf, axis), node in tr.leaf_nodes.items():
        for g in n.reach(node) & set(members):
            members[g].append((leaf, axis, n.unit_index(node, g)))
    out = []
    for r, prods in by_root.items():
        reason = n.reasons.get(r)
        if reason is None and (n.parts.get(r) or n.concats.get(r)):
            reason = (
                "are built from several axes (heads, norm groups, a concatenation), which the tracer does not prune"
            )
        out.append(UnitGroup(spec_lib.layer_of(prods[0]), tuple(prods), n.size[r], tuple(members[r]), reason))
    return out


def coupling(model: nnx.Module, *, input_shape: Sequence[int], dtype=jnp.float32) -> list[UnitGroup]:
    """The groups of coupled output units of ``model``, found by tracing its forward pass.

    Args:
      model: any NNX module called as ``model(x)``; traced in eval mode.
      input_shape: one example's shape, without the batch axis (``(28, 28, 1)``).
      dtype: the input dtype.

    Returns:
      one :class:`UnitGroup` per set of kernels whose output units are coupled, in the
      order of the model's state; ``reason`` says why a group cannot be pruned.

    Example:
      >>> [(g.layer, g.size, g.reason) for g in coupling(model, input_shape=(28, 28, 1))]
      [('fc1', 300, None), ('fc2', 100, None), ('fc3', 10, "reach the model's output")]
    """
    return _groups(_trace(model, input_shape, dtype))
