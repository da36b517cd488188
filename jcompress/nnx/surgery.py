"""Hard pruning of any NNX model: physically remove output units, found by tracing the model.

A mask only zeroes weights; the arrays keep their shapes and the model runs as many FLOPs
as before. :func:`hard_prune` removes whole output units of Dense and conv layers (the
last axis of a kernel) and every parameter indexed by the same units, and returns a
smaller model of the same classes.

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

**Exactness.** The new model computes what the masked model (``params * masks``)
computes. The tracer follows which values of the masked model are known without the
input: a removed unit of a Dense layer with a bias outputs ``act(bias)``, after an
eval-mode BatchNorm ``act(beta - gamma * mean / sqrt(var + eps))``. Where a consumer sees
such a constant the same way at every position (a Dense layer, a flattened feature map, a
VALID convolution) its contribution is folded into the consumer's bias; a padded
convolution sees it differently at the border, and there :func:`hard_prune` raises:
mask the unit's bias and norm scale/bias too (:func:`complete_masks`). Tracing sees ops,
not the Python code around them, so a model whose code reads array sizes (attention's
``1 / sqrt(head size)``) could change when its arrays shrink: the new model is run
against the masked model on a random batch, and a difference is an error.

Example:
  >>> hidden = jc.masked(jc.pruning.magnitude(sparsity=0.5, pattern=jc.Units()), r'fc[12]/kernel')
  >>> masks = hidden(nnx.state(model, nnx.Param))[1].masks
  >>> masks = complete_masks(model, masks, input_shape=(28, 28, 1))
  >>> small, aux = hard_prune(masks, input_shape=(28, 28, 1))(model)
  >>> aux.kept['fc1'], aux.params_after
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree
from jcompress.core import base
from jcompress.core import spec as spec_lib

__all__ = [
    "UnitGroup",
    "complete_masks",
    "coupling",
    "forward_flops",
    "hard_prune",
    "hard_prune_report",
    "leaf_shapes",
    "resize",
    "unit_masks",
]

PyTree = Any

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


# ----------------------------------------------------------------------------------------
# Which values of the masked model are known without the input
# ----------------------------------------------------------------------------------------


def _bind(eqn, *args):
    return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))


class _Known:
    """Evaluates the traced forward pass on the masked leaves with the input unknown.

    Each value is ``(val, unk)``: the array (0 where unknown) and a bool array marking the
    entries that depend on the input. At every contraction it checks what the removed
    units contribute: nothing (exact), a constant the same at every position (folded into
    the consumer's bias) or anything else (an error).
    """

    def __init__(self, tr: _Trace, removed_mask, layer_of_root):
        self.tr = tr
        self.removed_mask = removed_mask
        self.layer_of_root = layer_of_root
        self.i = 0
        self.folds: dict[str, np.ndarray] = {}

    def run(self, jaxpr, consts, ins) -> None:
        env: dict = {}

        def get(v):
            if isinstance(v, jcore.Literal):
                val = jnp.asarray(v.val)
                return val, np.zeros(val.shape, bool)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = (jnp.asarray(c), np.zeros(np.shape(c), bool))
        for v, x in zip(jaxpr.invars, ins):
            env[v] = x
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            args = [get(v) for v in eqn.invars]
            inner = _inner(eqn) if name in _CALLS else None
            if inner is not None:
                outs = self.run(inner[0], inner[1], args)
            elif name in ("dot_general", "conv_general_dilated"):
                outs = [self.contraction(eqn, *args[:2])]
            elif not any(u.any() for _, u in args):
                res = _bind(eqn, *[v for v, _ in args])
                res = res if eqn.primitive.multiple_results else [res]
                outs = [(r, np.zeros(np.shape(r), bool)) for r in res]
            else:
                outs = self.partial(eqn, args)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [get(v) for v in jaxpr.outvars]

    def partial(self, eqn, args) -> list:
        name = eqn.primitive.name
        vals = [v for v, _ in args]
        unks = [u for _, u in args]
        out_shape = _shape(eqn.outvars[0])
        try:
            val = _bind(eqn, *vals)
        except Exception:  # noqa: BLE001  (an op that cannot run on placeholder zeros: all unknown)
            val = None
        if eqn.primitive.multiple_results or val is None:
            return [
                (jnp.zeros(_shape(v), getattr(v.aval, "dtype", jnp.float32)), np.ones(_shape(v), bool))
                for v in eqn.outvars
            ]
        if name in _ELEMENTWISE:
            bshape = lambda u: np.broadcast_to(u, out_shape)
            if name == "mul":
                (a, ua), (b, ub) = args
                za, zb = ~ua & (np.asarray(a) == 0), ~ub & (np.asarray(b) == 0)
                unk = (bshape(ua) & ~bshape(zb)) | (bshape(ub) & ~bshape(za))
            else:
                unk = np.zeros(out_shape, bool)
                for u in unks:
                    unk = unk | bshape(u)
        elif name in _REDUCTIONS:
            unk = np.any(unks[0], axis=tuple(eqn.params["axes"]))
        elif name in _SHAPE_OPS or name in ("pad", "slice", "concatenate"):
            unk = np.asarray(_bind(eqn, *[jnp.asarray(u, jnp.float32) for u in unks])) > 0
        elif name.startswith("reduce_window") and name != "reduce_window":
            p = eqn.params
            unk = (
                np.asarray(
                    jax.lax.reduce_window(
                        jnp.asarray(unks[0], jnp.float32),
                        0.0,
                        jax.lax.max,
                        p["window_dimensions"],
                        p["window_strides"],
                        p["padding"],
                        p["base_dilation"],
                        p["window_dilation"],
                    )
                )
                > 0
            )
        else:
            unk = np.ones(out_shape, bool)
        return [(val, np.asarray(unk, bool).reshape(out_shape))]

    def contraction(self, eqn, lhs, rhs):
        c = self.tr.contractions[self.i]
        self.i += 1
        (a, ua), (b, ub) = lhs, rhs
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        za = np.where(ua, 0, np.asarray(a))
        zb = np.where(ub, 0, np.asarray(b))
        nza, nzb = ua | (za != 0), ub | (zb != 0)
        val = _bind(eqn, jnp.asarray(za, a.dtype), jnp.asarray(zb, b.dtype))
        count = lambda x, y: np.asarray(_bind(eqn, f32(x), f32(y))) > 0
        unk = count(ua, nzb) | count(nza, ub)
        # the entries of the lhs that belong to removed units, on any contracted axis
        keep = np.ones(np.shape(a), bool)
        roots = []
        for ax, node in zip(c.lhs_axes, [c.lhs[k] for k in c.lhs_axes]):
            m = self.removed_mask(node)
            if m is not None:
                shape = [1] * keep.ndim
                shape[ax] = -1
                keep = keep & ~m.reshape(shape)
                roots.append(node)
        if roots:
            drop = ~keep
            declared = any(a in self.tr.declared for r in roots for a in self.tr.nodes.reach(r))
            if (count(ua & drop, nzb) | count(nza & drop, ub)).any():
                if declared:  # the module vouches that its removed units output 0
                    return val, unk
                raise ValueError(
                    f"the removed units of {self.layer_of_root(roots[0])} carry input-dependent values into "
                    f"{spec_lib.layer_of(c.kernel) if c.kernel else eqn.primitive.name}; hard pruning would change the outputs"
                )
            d = np.asarray(_bind(eqn, f32(np.where(drop, za, 0)), f32(zb)), np.float64)
            if np.any(d != 0):
                self.fold(c, d, roots[0])
        return val, unk

    def fold(self, c: _Contraction, d: np.ndarray, root) -> None:
        layer = self.layer_of_root(root)
        consumer = spec_lib.layer_of(c.kernel) if c.kernel else "a contraction"
        rows = np.moveaxis(d, c.out_feature_axis, -1).reshape(-1, d.shape[c.out_feature_axis])
        scale = max(1.0, float(np.max(np.abs(rows))))
        uniform = np.allclose(rows, rows[:1], rtol=0, atol=1e-6 * scale)
        if not uniform or c.bias is None:
            why = (
                f"{consumer} sees that constant differently at different positions (a padded convolution)"
                if not uniform
                else f"{consumer} has no bias to absorb it"
            )
            raise ValueError(
                f"removed units of {layer} output a nonzero constant (their bias or norm parameters are not masked, "
                f"up to {float(np.max(np.abs(d))):.4g} in {consumer}'s outputs) and {why}, so removing them would "
                "change the outputs. Mask their bias and norm scale/bias too: complete_masks(model, masks, "
                "input_shape=...), or unit_masks(...), which remove units entirely."
            )
        self.folds[c.bias] = self.folds.get(c.bias, 0.0) + rows[0]


# ----------------------------------------------------------------------------------------
# Hard pruning
# ----------------------------------------------------------------------------------------


def _mask_dict(trace: _Trace, masks: PyTree | None) -> dict[str, np.ndarray]:
    if masks is None:
        return {}
    flat = {n: np.asarray(m, bool) for n, m in tree.named_leaves(masks)}
    missing = sorted(trace.param_names - set(flat))
    extra = sorted(set(flat) - trace.param_names)
    if missing or extra:
        raise ValueError(
            f"masks must have the structure of the model's nnx.Param state (a bool tree, e.g. MaskAux.masks); "
            f"missing {missing[:5]}, unknown {extra[:5]}"
        )
    leaves = dict(tree.named_leaves(nnx.to_pure_dict(trace.state)))
    for n, m in flat.items():
        if m.shape != tuple(jnp.shape(leaves[n])):
            raise ValueError(f"masks[{n!r}] has shape {m.shape}, the leaf has {tuple(jnp.shape(leaves[n]))}")
    return flat


def _removed_units(group: UnitGroup, leaves: dict, masks: dict) -> np.ndarray:
    """True for the units every producer has removed (column all False in masks, or all 0)."""
    out = np.ones(group.size, bool)
    for k in group.producers:
        col = masks[k] if masks else np.asarray(leaves[k]) != 0
        out &= ~col.reshape(-1, group.size).any(axis=0)
    return out


class _Plan(NamedTuple):
    trace: _Trace
    groups: dict  # root -> UnitGroup
    removed: dict  # root -> bool array over the group's units


def _plan(model, names, masks, input_shape, dtype, allow_empty) -> _Plan:
    tr = _trace(model, input_shape, dtype)
    mdict = _mask_dict(tr, masks)
    leaves = dict(tree.named_leaves(nnx.to_pure_dict(tr.state)))
    n = tr.nodes
    groups = {
        n.find(tr.leaf_nodes[(g.producers[0], len(jnp.shape(leaves[g.producers[0]])) - 1)]): g for g in _groups(tr)
    }
    chosen = set(names)
    removed = {}
    for r, g in groups.items():
        if not chosen & set(g.producers):
            continue
        gone = _removed_units(g, leaves, mdict)
        if not gone.any():
            continue
        if g.reason is not None:
            raise ValueError(
                f"cannot remove units of {g.layer} ({', '.join(g.producers)}): they {g.reason}. Leave this layer out "
                "(jc.masked(..., selection) over the other layers), or declare its units with a coupled_units() "
                "method on the module (see jcompress.nnx.surgery)."
            )
        if gone.all() and not allow_empty:
            raise ValueError(
                f"the masks remove every unit of {g.layer} ({', '.join(g.producers)}), which would leave an empty "
                "layer; keep at least one unit or pass allow_empty=True"
            )
        removed[r] = gone
    return _Plan(tr, groups, removed)


def _removed_mask_fn(plan: _Plan):
    n = plan.trace.nodes

    def removed_mask(node):
        hit = n.reach(node) & set(plan.removed)
        if not hit:
            return None
        out = np.zeros(n.size[n.find(node)], bool)
        for g in hit:
            idx = n.unit_index(node, g)
            out |= (idx >= 0) & plan.removed[g][np.maximum(idx, 0)]
        return out

    return removed_mask


def _fix_sizes(model: nnx.Module) -> None:
    """Set the size attributes of Linear, LinearGeneral, Conv and norm layers from their (new) arrays."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Linear):
            m.in_features, m.out_features = (int(d) for d in m.kernel.shape)
        elif isinstance(m, nnx.LinearGeneral):
            shape, n_in, n_out = m.kernel.shape, len(m.in_features), len(m.out_features)
            m.in_features = tuple(int(d) for d in shape[len(shape) - n_out - n_in : len(shape) - n_out])
            m.out_features = tuple(int(d) for d in shape[len(shape) - n_out :])
        elif isinstance(m, nnx.Conv):
            m.in_features = int(m.kernel.shape[-2]) * m.feature_group_count
            m.out_features = int(m.kernel.shape[-1])
        elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
            arr = next((getattr(m, a) for a in ("scale", "bias", "mean") if getattr(m, a, None) is not None), None)
            if arr is not None:
                m.num_features = int(arr.shape[-1])


def _with_leaves(trace: _Trace, values: dict) -> nnx.Module:
    state = tree.from_pure_dict(trace.state, _unflatten(trace.state, values))
    new = nnx.merge(trace.graphdef, state)
    _fix_sizes(new)
    return new


def _unflatten(state, values: dict):
    pure = nnx.to_pure_dict(state)
    return tree.map_with_names(lambda n, x: values[n], pure)


def _eval_forward(model: nnx.Module):
    graphdef, state = nnx.split(model)

    def forward(st, x):
        m = nnx.merge(graphdef, st)
        m.eval()
        return m(x)

    return jax.jit(forward), state


def _check_same(new: nnx.Module, masked: nnx.Module, input_shape, dtype) -> None:
    """Raise a ValueError when the pruned model does not compute what the masked model computes.

    Tracing sees the ops, not the Python code around them: a model whose code reads array
    sizes (attention's ``1 / sqrt(head size)``, a check that key and value heads have one
    size) changes when its arrays shrink. Both models are run on one random batch (normal
    floats, or integers in {0, 1} such as token ids).
    """
    if jnp.issubdtype(dtype, jnp.floating):
        x = jax.random.normal(jax.random.key(0), (2, *input_shape), dtype)
    else:
        x = jax.random.randint(jax.random.key(0), (2, *input_shape), 0, 2).astype(dtype)
    fwd, state = _eval_forward(masked)
    want = jax.tree.leaves(fwd(state, x))
    fwd, state = _eval_forward(new)
    try:
        got = jax.tree.leaves(fwd(state, x))
    except Exception as e:  # any error of the model's own code
        raise ValueError(
            f"the pruned model does not run: {type(e).__name__}: {e}. Its code checks sizes that tracing cannot "
            "see (e.g. attention needs equal key and value head sizes); leave those layers out with jc.masked."
        ) from e
    for g, w in zip(got, want):
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        diff = float(jnp.max(jnp.abs(g - w))) if g.shape == w.shape else float("inf")
        if not diff <= 1e-4 * scale:
            raise ValueError(
                f"the pruned model computes something else than the masked model (largest difference {diff:.3g} on "
                "a random input): its code uses the sizes of its arrays (e.g. attention scales by 1 / sqrt(head "
                "size)), which tracing cannot see; leave those layers out with jc.masked."
            )


def _prune(model: nnx.Module, names, masks, input_shape, dtype, allow_empty) -> tuple[nnx.Module, base.UnitsAux]:
    plan = _plan(model, names, masks, input_shape, dtype, allow_empty)
    tr = plan.trace
    mdict = _mask_dict(tr, masks)
    leaves = {n: jnp.asarray(v) for n, v in tree.named_leaves(nnx.to_pure_dict(tr.state))}
    masked_leaves = {n: (jnp.where(mdict[n], v, 0) if n in mdict else v) for n, v in leaves.items()}
    masked_model = _with_leaves(tr, masked_leaves)
    removed_mask = _removed_mask_fn(plan)
    if plan.removed:
        layer_of_root = lambda node: next(
            (plan.groups[a].layer for a in tr.nodes.reach(node) if a in plan.groups), "a layer"
        )
        known = _Known(tr, removed_mask, layer_of_root)
        x = jnp.zeros((2, *input_shape), dtype)
        ins = [(masked_leaves[n], np.zeros(jnp.shape(masked_leaves[n]), bool)) for n in tr.names]
        known.run(tr.jaxpr, tr.consts, [*ins, (x, np.ones(x.shape, bool))])
        for b, shift in known.folds.items():
            v = masked_leaves[b]
            masked_leaves[b] = (np.asarray(v, np.float64) + shift.reshape(np.shape(v))).astype(v.dtype)
    new_leaves = {}
    for name in tr.names:
        v = masked_leaves[name]
        for axis in range(np.ndim(v)):
            m = removed_mask(tr.leaf_nodes[(name, axis)])
            if m is not None:
                v = jnp.take(jnp.asarray(v), np.flatnonzero(~m), axis=axis)
        new_leaves[name] = jnp.asarray(v)
    new = _with_leaves(tr, new_leaves)
    _check_same(new, masked_model, input_shape, dtype)
    kept = {}
    for r, g in plan.groups.items():
        if r in plan.removed:
            for p in g.producers:
                kept[spec_lib.layer_of(p)] = np.flatnonzero(~plan.removed[r])
    before = base.params_count(nnx.state(model, nnx.Param))
    after = base.params_count(nnx.state(new, nnx.Param))
    return new, base.UnitsAux(kept, before, after)


def hard_prune(
    masks: PyTree | None = None, *, input_shape: Sequence[int], dtype=jnp.float32, allow_empty: bool = False
) -> base.ModelTransform:
    """Remove the output units of Dense and conv layers that are zero, or that ``masks`` remove.

    Works on any NNX model: the coupled dimensions are found by tracing its forward pass
    (see the module docstring). Unit ``j`` of a group of coupled layers is removed when
    column ``j`` (``kernel[..., j]``) is all False in ``masks`` (or, without masks, all 0)
    in every kernel writing the group; then every leaf axis indexed by the group is sliced:
    the kernels' columns and biases, norm scales, biases and running statistics, the input
    rows of the layers reading them (strided rows after a flatten).

    Args:
      masks: a bool tree with the structure of the model's ``nnx.Param`` state (True =
        kept), e.g. ``MaskAux.masks`` of a ``Units`` pattern; None to remove the units
        whose kernel columns are already all zero.
      input_shape: one example's shape without the batch axis, to trace the model.
      dtype: the input dtype.
      allow_empty: allow a group to lose all its units (zero-width arrays) instead of raising.

    Returns:
      a :class:`~jcompress.core.base.ModelTransform`; ``t(model)`` returns ``(new_model,
      UnitsAux)``. ``new_model`` has the classes and graph of ``model`` with smaller
      arrays and computes, in eval mode, what ``model`` with its params multiplied by
      ``masks`` computes (to float32 rounding); masked entries that are not removed stay 0.
      ``aux.kept[layer]`` are the kept unit indices of each layer that lost units. The
      groups considered are those of the transform's leaves (Dense and conv kernels; see
      :func:`jcompress.core.base.masked`). ``model`` is not modified.

    Raises:
      ValueError: masks not shaped like the params; units removed from a group that
        cannot be pruned (names the layer and the reason, e.g. a LayerNorm over them or
        the model's outputs); a group emptied without ``allow_empty``; removed units that
        output a nonzero constant seen differently at different positions (mask their
        bias and norm parameters too: :func:`complete_masks`).

    Example:
      >>> _, aux = jc.masked(jc.pruning.magnitude(sparsity=0.5, pattern=jc.Units()), r'fc[12]')(params)
      >>> small, units = hard_prune(aux.masks, input_shape=(28, 28, 1))(model)
      >>> units.params_after < units.params_before
      True
    """
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(
            f"input_shape={input_shape!r} must be one example's shape without the batch axis, e.g. (28, 28, 1)"
        )
    shape = tuple(int(spec_lib.check_value(d, arg="input_shape", kind=int, lo=1)) for d in input_shape)

    def apply(model, names, key):
        return _prune(model, names, masks, shape, dtype, allow_empty)

    return base.ModelTransform(apply, "hard_prune")


def complete_masks(model: nnx.Module, masks: PyTree, *, input_shape: Sequence[int], dtype=jnp.float32) -> PyTree:
    """``masks`` plus every parameter entry of the units they remove (biases, norm scale/bias, rows).

    A unit whose kernel column is masked still outputs a constant (its bias, its norm's
    shift); masked this way it outputs 0, so :func:`hard_prune` is exact for any consumer,
    padded convolutions included. Use it before fine-tuning with structured masks.

    Returns:
      a bool tree with the structure of ``masks``.
    """
    return _unit_masks(model, masks, None, tuple(input_shape), dtype)


def unit_masks(
    model: nnx.Module, keep: Mapping[str, Sequence[int]], *, input_shape: Sequence[int], dtype=jnp.float32
) -> PyTree:
    """Masks that remove whole units: all but ``keep[layer]`` of each named layer's units.

    Args:
      model: any NNX model.
      keep: ``{layer: kept unit indices}``; a layer is a kernel's layer name (``'fc1'``,
        ``'blocks/0/conv1'``; ``'fc1/kernel'`` is accepted) and must produce a prunable group.
      input_shape: one example's shape, to trace the model.

    Returns:
      a bool tree with the structure of the model's ``nnx.Param`` state, False on every
      entry indexed by a removed unit (kernel column, bias, norm scale/bias, consumer rows).
    """
    return _unit_masks(model, None, keep, tuple(input_shape), dtype)


def _unit_masks(model, masks, keep, input_shape, dtype):
    tr = _trace(model, input_shape, dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = dict(tree.named_leaves(params))
    groups = _groups(tr)
    n = tr.nodes
    root = lambda g: n.find(tr.leaf_nodes[(g.producers[0], np.ndim(leaves[g.producers[0]]) - 1)])
    removed = {}
    if keep is not None:
        by_layer = {spec_lib.layer_of(p): g for g in groups for p in g.producers}
        for layer, idx in keep.items():
            base_name = layer.removesuffix("/kernel")
            if base_name not in by_layer:
                raise ValueError(
                    f"keep names {layer!r}, which is not a layer with a kernel; the layers are {sorted(by_layer)}"
                )
            g = by_layer[base_name]
            arr = np.asarray(idx)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"keep[{layer!r}] must be a 1-D list of unit indices, got {idx!r}")
            if arr.size == 0:
                raise ValueError(f"keep[{layer!r}] is empty: a layer must keep at least one unit")
            if arr.min() < 0 or arr.max() >= g.size or len(np.unique(arr)) != arr.size:
                raise ValueError(f"keep[{layer!r}] must hold distinct indices in [0, {g.size}), got {idx!r}")
            if g.reason is not None:
                raise ValueError(f"cannot remove units of {g.layer}: they {g.reason}")
            gone = np.ones(g.size, bool)
            gone[arr] = False
            removed[root(g)] = gone
    else:
        mdict = _mask_dict(tr, masks)
        for g in groups:
            gone = _removed_units(g, leaves, mdict)
            if gone.any() and g.reason is None:
                removed[root(g)] = gone
    plan = _Plan(tr, {root(g): g for g in groups}, removed)
    removed_mask = _removed_mask_fn(plan)

    def one(name, w):
        keep_ = np.ones(np.shape(w), bool)
        for axis in range(np.ndim(w)):
            m = removed_mask(tr.leaf_nodes[(name, axis)])
            if m is not None:
                shape = [1] * np.ndim(w)
                shape[axis] = -1
                keep_ &= ~m.reshape(shape)
        return jnp.asarray(keep_)

    made = tree.map_with_names(one, params)
    if masks is None:
        return made
    return tree.map_with_names(lambda nm, m: jnp.logical_and(m, jnp.asarray(dict(tree.named_leaves(made))[nm])), masks)


# ----------------------------------------------------------------------------------------
# Shapes for checkpoints, FLOPs and the before/after report
# ----------------------------------------------------------------------------------------


def leaf_shapes(model: nnx.Module) -> dict[str, list[int]]:
    """``{leaf name: shape}`` of every leaf of the model's state (JSON-ready, for checkpoint metadata)."""
    return {n: [int(d) for d in jnp.shape(v)] for n, v in tree.named_leaves(nnx.to_pure_dict(nnx.state(model)))}


def resize(model: nnx.Module, shapes: Mapping[str, Sequence[int]]) -> nnx.Module:
    """A copy of ``model`` whose leaves have ``shapes`` (zeros) and whose layer sizes match.

    The structure to restore a hard-pruned checkpoint into: save ``leaf_shapes(small)``
    in the metadata, and rebuild with ``checkpoint.load_model(dir, build=lambda meta:
    resize(models.create(**meta['model']), meta['shapes']))``.

    Raises:
      ValueError: ``shapes`` names a leaf the model lacks, or misses one.
    """
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    names = {n for n, _ in tree.named_leaves(pure)}
    if set(shapes) != names:
        raise ValueError(
            f"shapes must name every leaf of the model: missing {sorted(names - set(shapes))[:5]}, "
            f"unknown {sorted(set(shapes) - names)[:5]}"
        )
    values = tree.map_with_names(lambda n, x: jnp.zeros(tuple(shapes[n]), jnp.result_type(x)), pure)
    new = nnx.merge(graphdef, tree.from_pure_dict(state, values))
    _fix_sizes(new)
    return new


def forward_flops(model: nnx.Module, input_shape: Sequence[int], *, dtype=jnp.float32) -> dict[str, int]:
    """FLOPs per example of every Dense, conv and other contraction in the traced forward pass.

    Keyed by the kernel leaf a contraction reads (``'fc1/kernel'``), or ``'dot_general_<i>'``
    for contractions between activations (attention). A contraction costs 2 FLOPs per
    multiply-add; elementwise work is not counted.
    """
    out: dict[str, int] = {}
    for i, c in enumerate(_trace(model, tuple(input_shape), dtype).contractions):
        key = c.kernel or f"dot_general_{i}"
        out[key] = out.get(key, 0) + c.flops // 2
    return out


def hard_prune_report(
    before: nnx.Module, after: nnx.Module, input_shape: Sequence[int], *, batch_size: int = 256, repeats: int = 20
) -> dict:
    """Parameters, FLOPs and measured latency of two models, and their ratios.

    FLOPs are :func:`forward_flops` per example; latency is the median of ``repeats``
    interleaved calls (``jcompress.timing.compare``, after a warm-up call) of the jitted
    eval-mode forward pass on a ``(batch_size, *input_shape)`` float32 batch.

    Returns:
      ``{'before': {...}, 'after': {...}, 'params_ratio', 'flops_ratio', 'latency_ratio',
      'batch_size'}`` with each ratio ``before / after``.
    """
    from jcompress import timing

    x = jnp.zeros((batch_size, *input_shape), jnp.float32)
    calls = {}
    out = {}
    for label, model in (("before", before), ("after", after)):
        fwd, state = _eval_forward(model)
        calls[label] = lambda fwd=fwd, state=state: fwd(state, x)
        out[label] = {
            "params": base.params_count(nnx.state(model, nnx.Param)),
            "flops": int(sum(forward_flops(model, input_shape).values())),
        }
    for label, t in timing.compare(calls, repeats=repeats).items():
        out[label]["latency_s"] = t.median
    b, a = out["before"], out["after"]
    ratio = lambda k: b[k] / a[k] if a[k] else math.inf
    return {
        "before": b,
        "after": a,
        "params_ratio": ratio("params"),
        "flops_ratio": ratio("flops"),
        "latency_ratio": ratio("latency_s"),
        "batch_size": batch_size,
    }
