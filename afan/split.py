"""Split a model into a head and a tail at one of its submodules.

A-FAN perturbs an intermediate feature ``h``: it needs ``head(x)``, the output of one layer,
and ``tail(h)``, the rest of the model from that feature on.  ``split(model, at)`` builds both
from the model itself, without changing it::

    head, tail = split(model, "layer2")
    h = head(x)            # what model.layer2 returns inside model(x)
    y = tail(h, x)         # == model(x); tail(h) alone where the rest needs nothing else

How: torch.fx traces the model's ``forward`` (and the ``forward`` of each module on the way
down to ``at``) into a graph whose other submodules stay opaque calls; the graph is cut at the
call of ``at``.  The head is everything ``at``'s output depends on; the tail is everything the
model's output depends on, with ``at``'s output as its first argument.  Values the tail needs
that are not functions of ``at``'s output (a skip connection from an earlier layer, the input
size an output is resized to) are recomputed from ``x``, which is why such tails need
``tail(h, x)``; ``tail.needs_input`` says whether this one does.

The parts are views of the model, not copies:

* they run the model's own submodules and read its own parameters and buffers at call time,
  so an optimizer over ``model.parameters()`` trains them, ``model.state_dict()`` keeps its
  keys, and ``model.to(device)`` or ``model.load_state_dict(...)`` after the split apply;
* ``head.parameters()`` / ``head.state_dict()`` list the model's objects that the part uses,
  under the model's names (``head.get_submodule("layer1.0.conv1") is model.layer1[0].conv1``);
* they share the model's mode: ``head.training`` is ``model.training``, and
  ``head.train()`` / ``tail.eval()`` switch the whole model, like ``model.train()`` does.

The model is traced once in training mode and once in evaluation mode, and each call runs the
graph of the model's current mode, so ``if self.training:`` branches in a traced ``forward``
stay right.  Python control flow in those traced forwards is otherwise fixed at split time;
every other submodule runs its own ``forward`` at each call, so its dropout, BatchNorm, or any
state it reads (``afan.use_aux_bn``, ``afan.frozen_bn_stats``) behaves as in ``model(x)``.

Where torch.fx cannot trace the model (data-dependent control flow, as in torchvision's
detection models), ``method="hooks"`` splits it with forward hooks instead; see ``split``.
"""
from __future__ import annotations

import difflib
import linecache
import sys
import warnings
from typing import Any, Callable, Iterable

from torch import fx, nn

__all__ = ["split", "SplitTraceError"]

METHODS = ("auto", "fx", "hooks")


class SplitTraceError(RuntimeError):
    """torch.fx could not trace the model (``split(..., method="fx")``); ``reason`` says why."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def split(model: nn.Module, at: str, method: str = "auto") -> tuple[nn.Module, nn.Module]:
    """``(head, tail)`` of ``model`` cut after its submodule named ``at``.

    ``head(*inputs)`` takes the model's inputs and returns the output of ``model.get_submodule(at)``
    as it is inside ``model(*inputs)``.  ``tail(h, *inputs)`` returns what ``model(*inputs)``
    would return were that output ``h``; so ``tail(head(x), x)`` equals ``model(x)``.  Where the
    rest of the model needs nothing but ``h`` (``tail.needs_input`` is False), ``tail(h)`` works
    too and any inputs passed are ignored; otherwise calling it without them raises TypeError.
    Both parts are views of ``model`` (see the module docstring): shared parameters, shared mode.

    ``method``:

    * ``"fx"``: trace with torch.fx (exact, and the head and tail each run only their own part;
      a tail that needs the inputs recomputes only the values it needs from them).  Raises
      ``SplitTraceError`` naming the tracing failure if the model cannot be traced.
    * ``"hooks"``: no tracing.  ``head`` runs the model until ``at`` returns, then stops it;
      ``tail(h, *inputs)`` runs the whole model again with ``at``'s output replaced by ``h``,
      so it always needs the inputs and recomputes the head inside every call: slower, but
      exact for any model whose head is deterministic (in training mode, dropout before ``at``
      draws new random numbers in the tail, and BatchNorm layers before ``at`` update their
      running statistics once more).
    * ``"auto"`` (default): ``"fx"``, falling back to ``"hooks"`` with a warning naming the
      tracing error.

    Raises ValueError if ``at`` is not a submodule of ``model`` (with close names), is the model
    itself, is never called or called more than once by ``model.forward``, or if its output
    does not reach the model's output.
    """
    if method not in METHODS:
        raise ValueError(f"split: method must be one of {METHODS}, got {method!r}")
    at = _canonical_name(model, at)
    if method == "hooks":
        return _HookHead(model, at), _HookTail(model, at)
    try:
        graphs = {training: _trace(model, at, training) for training in (True, False)}
    except SplitTraceError as error:
        if method == "fx":
            raise
        warnings.warn(f"{error.reason}; falling back to split(model, {at!r}, method='hooks'), whose "
                      "tail re-runs the head (slower, but exact)", stacklevel=2)
        return _HookHead(model, at), _HookTail(model, at)
    cuts = {training: _cut(graph, at) for training, graph in graphs.items()}
    head = _GraphHead(model, at, {training: c[0] for training, c in cuts.items()})
    tail = _GraphTail(model, at, {training: c[1] for training, c in cuts.items()})
    return head, tail


# --- checking `at` ------------------------------------------------------------------------------

def _canonical_name(model: nn.Module, at: str) -> str:
    """``at``, checked; for a module registered under several names, the first one, which is
    the name torch.fx gives its calls."""
    if not isinstance(at, str):
        raise TypeError(f"split: at must be a submodule's qualified name (a str), got {type(at).__name__}")
    if at == "":
        raise ValueError("split: at='' is the model itself; name one of its submodules, e.g. 'layer2'")
    modules = dict(model.named_modules(remove_duplicate=False))
    if at not in modules:
        close = difflib.get_close_matches(at, [name for name in modules if name], n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"split: {type(model).__name__} has no submodule named {at!r}{hint}")
    return next(name for name, module in model.named_modules() if module is modules[at])


def _contains(outer: str, inner: str) -> bool:
    """Whether the module named ``outer`` is a strict ancestor of the one named ``inner``."""
    return outer == "" or inner.startswith(outer + ".")


# --- tracing ------------------------------------------------------------------------------------

class _CutTracer(fx.Tracer):
    """Traces only the forwards on the way down to ``at``; every other submodule, ``at``
    included, becomes one opaque call.  So the graph can be cut at ``at``'s call, and the other
    modules keep reading their own state (mode, BN routing, flags) at run time."""

    def __init__(self, at: str):
        super().__init__(autowrap_functions=_registered_notrace_functions())
        self.at = at

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return not _contains(qualname, self.at)


def _registered_notrace_functions() -> tuple[Callable, ...]:
    """Functions timm asks tracers not to trace into (its model forwards call some), where timm
    is already loaded; this module itself never imports it."""
    if "timm.layers" not in sys.modules:
        return ()
    from timm.layers import get_notrace_functions
    return tuple(fn for fn in get_notrace_functions() if callable(fn))


def _trace(model: nn.Module, at: str, training: bool) -> fx.Graph:
    """The graph of ``model.forward`` in training or evaluation mode; every module's own mode
    is restored afterwards (a user's frozen BatchNorm stays in eval mode)."""
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        return _CutTracer(at).trace(model)
    except Exception as error:
        mode = "training" if training else "evaluation"
        reason = (f"split: torch.fx could not trace {type(model).__name__} in {mode} mode "
                  f"({type(error).__name__}: {error})")
        raise SplitTraceError(
            f"{reason}; split(model, {at!r}, method='hooks') splits it without tracing "
            "(its tail re-runs the head: slower, but exact)", reason
        ) from error
    finally:
        for module, mode in modes.items():
            module.training = mode


# --- cutting the graph --------------------------------------------------------------------------

def _cut(graph: fx.Graph, at: str) -> tuple[fx.Graph, fx.Graph]:
    """The head graph and the tail graph of one traced graph."""
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == at]
    if not calls:
        raise ValueError(
            f"split: the model's forward never calls {at!r} (nor do the forwards of the modules that "
            "contain it), so there is nothing to cut; if another module calls it, try method='hooks'"
        )
    if len(calls) > 1:
        raise ValueError(
            f"split: the model's forward calls {at!r} {len(calls)} times; split at a module it calls once"
        )
    return _head_graph(graph, calls[0]), _tail_graph(graph, calls[0], at)


def _needed(graph: fx.Graph, roots: Iterable[fx.Node], cut: fx.Node | None = None) -> set[fx.Node]:
    """The nodes that computing ``roots`` runs: their ancestors (not looking past ``cut``, whose
    value the tail gets as an argument), plus calls whose result is unused but whose inputs are
    all needed.  fx records an in-place call like ``x.relu_()`` only as a user of ``x``; were
    such calls left out, ``x`` would be read unchanged."""
    needed: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            if node is not cut:
                todo.extend(node.all_input_nodes)
    for node in graph.nodes:
        if (node.op in ("call_function", "call_method", "call_module") and not node.users
                and node is not cut and node.all_input_nodes
                and all(arg in needed for arg in node.all_input_nodes)):
            needed.add(node)
    return needed


def _copy(graph: fx.Graph, keep: set[fx.Node], env: dict[fx.Node, fx.Node], new: fx.Graph) -> None:
    """Copy the nodes of ``graph`` in ``keep`` into ``new``, in order; ``env`` maps old nodes to
    new ones, and starts with the nodes that ``new`` already provides."""
    for node in graph.nodes:
        if node in keep and node not in env:
            env[node] = new.node_copy(node, lambda arg: env[arg])


def _head_graph(graph: fx.Graph, cut: fx.Node) -> fx.Graph:
    """The model's inputs to ``at``'s output, computing only what that output depends on."""
    placeholders = {node for node in graph.nodes if node.op == "placeholder"}  # the model's signature
    before_cut = []
    for node in graph.nodes:
        before_cut.append(node)
        if node is cut:
            break
    # The model's own checks before `at` (torch._assert on the input's shape, ...) stay in the
    # head, so that head(x) refuses what model(x) refuses.
    checks = [node for node in before_cut
              if node.op == "call_function" and node.is_impure(impure_random=False)]
    head, env = fx.Graph(), {}
    _copy(graph, placeholders | (_needed(graph, [cut, *checks]) & set(before_cut)), env, head)
    head.output(env[cut])
    head.lint()
    return head


def _tail_graph(graph: fx.Graph, cut: fx.Node, at: str) -> fx.Graph:
    """``at``'s output (first argument) and, where needed, the model's inputs to the model's output."""
    output = next(node for node in graph.nodes if node.op == "output")
    keep = _needed(graph, [output], cut)
    if cut not in keep:
        raise ValueError(f"split: the output of {at!r} does not reach the model's output, so it has no tail")
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if any(node in keep for node in placeholders):
        keep.update(placeholders)  # all of them, so the tail takes the model's inputs in order
    else:
        keep.difference_update(placeholders)
    tail = fx.Graph()
    name = "h"
    while name in {node.target for node in placeholders}:
        name += "_"
    env = {cut: tail.placeholder(name)}
    _copy(graph, keep, env, tail)
    tail.lint()
    return tail


def _compile(graph: fx.Graph, label: str) -> Callable[..., Any]:
    """``graph`` as a function ``f(model, *args)`` that looks up the model's submodules,
    parameters and buffers at each call: the parts hold no copy that could go stale."""
    code = graph.python_code(root_module="self")
    filename = f"<afan.split {label}>"
    # Register the source, so that tracebacks through the part show its lines.
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(keepends=True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]


# --- the parts ----------------------------------------------------------------------------------

class _View(nn.Module):
    """A part of ``model``: runs on the model's own objects and shares its mode.

    The model is kept out of ``_modules`` (a child would put all of it in this part's
    ``parameters()`` and ``state_dict()`` under a prefix); instead the objects the part uses
    are registered under the model's own names (see ``_reference``).
    """

    def __init__(self, model: nn.Module, at: str, names: Iterable[str]):
        super().__init__()
        self.__dict__["_model"] = model
        self.at = at
        _reference(self, model, names)

    @property
    def training(self) -> bool:  # the model's mode: one model, one mode
        return self._model.training

    @training.setter
    def training(self, mode: bool) -> None:
        if "_model" in self.__dict__:  # nn.Module.__init__ sets it before the model is attached
            self._model.training = mode

    def train(self, mode: bool = True) -> "_View":
        """Switch the whole model (and so both parts) to training or evaluation mode."""
        self._model.train(mode)
        return self


def _reference(view: nn.Module, model: nn.Module, names: Iterable[str]) -> None:
    """Register the model's modules, parameters and buffers named ``names`` on ``view`` under
    the same names: the same objects, not copies.  A name inside one already registered is
    covered by it."""
    done: list[str] = []
    for name in sorted(set(names)):
        if any(name.startswith(prefix + ".") for prefix in done):
            continue
        *path, field = name.split(".")
        source = model.get_submodule(".".join(path))
        target = view
        for atom in path:  # containers that only give the names their prefix
            if atom not in target._modules:
                target.add_module(atom, nn.Module())
            target = target._modules[atom]
        if field in source._modules:
            target.add_module(field, source._modules[field])
        elif field in source._parameters:
            target.register_parameter(field, source._parameters[field])
        elif field in source._buffers:
            target.register_buffer(field, source._buffers[field],
                                   persistent=field not in source._non_persistent_buffers_set)
        else:
            continue  # a constant fx stored on the model: not state
        done.append(name)


def _graph_targets(graphs: Iterable[fx.Graph]) -> set[str]:
    return {node.target for graph in graphs for node in graph.nodes if node.op in ("call_module", "get_attr")}


class _GraphPart(_View):
    """A part built by torch.fx: one compiled graph per mode, picked by the model's mode."""

    kind = "part"

    def __init__(self, model: nn.Module, at: str, graphs: dict[bool, fx.Graph]):
        super().__init__(model, at, _graph_targets(graphs.values()))
        self.graphs = graphs
        self._forwards = {
            training: _compile(graph, f"{self.kind} of {type(model).__name__} at {at}, training={training}")
            for training, graph in graphs.items()
        }

    @property
    def code(self) -> str:
        """The Python code this part runs in the model's current mode."""
        return self.graphs[self.training].python_code(root_module="self").src


class _GraphHead(_GraphPart):
    kind = "head"

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        return self._forwards[self.training](self._model, *inputs, **kwargs)


class _GraphTail(_GraphPart):
    kind = "tail"

    def __init__(self, model: nn.Module, at: str, graphs: dict[bool, fx.Graph]):
        super().__init__(model, at, graphs)
        # A tail graph takes `h` alone, or `h` and then all of the model's inputs.
        self._needs_input = {training: sum(node.op == "placeholder" for node in graph.nodes) > 1
                             for training, graph in graphs.items()}

    @property
    def needs_input(self) -> bool:
        """Whether, in the model's current mode, this tail needs the model's inputs too."""
        return self._needs_input[self.training]

    def forward(self, h: Any, *inputs: Any, **kwargs: Any) -> Any:
        forward = self._forwards[self.training]
        if not self.needs_input:
            return forward(self._model, h)
        if not inputs and not kwargs:
            raise TypeError(_needs_input_message(self._model, self.at))
        return forward(self._model, h, *inputs, **kwargs)


def _needs_input_message(model: nn.Module, at: str) -> str:
    return (f"the tail of {type(model).__name__} at {at!r} also needs the model's input x "
            "(later layers use values computed before it): call tail(h, x)")


# --- the hook fallback --------------------------------------------------------------------------

class _StopForward(BaseException):
    """Carries ``at``'s output out of a forward pass stopped there.  A BaseException, so that a
    model's own ``except Exception`` cannot swallow it."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output


class _HookPart(_View):
    """A part built with forward hooks: it may run any of the model, so it references all of it."""

    def __init__(self, model: nn.Module, at: str):
        names = [name for name, _ in model.named_children()]
        names += [name for name, _ in model.named_parameters(recurse=False)]
        names += [name for name, _ in model.named_buffers(recurse=False)]
        super().__init__(model, at, names)


class _HookHead(_HookPart):
    """Runs the model until ``at`` returns, and returns that output."""

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        def stop(module: nn.Module, args: Any, output: Any) -> None:
            raise _StopForward(output)

        handle = self._model.get_submodule(self.at).register_forward_hook(stop)
        try:
            self._model(*inputs, **kwargs)
        except _StopForward as stopped:
            return stopped.output
        finally:
            handle.remove()
        raise ValueError(f"split: {type(self._model).__name__} ran to its end without calling {self.at!r}")


class _HookTail(_HookPart):
    """Runs the whole model with ``at``'s output replaced by ``h`` (the head runs again)."""

    needs_input = True

    def forward(self, h: Any, *inputs: Any, **kwargs: Any) -> Any:
        if not inputs and not kwargs:
            raise TypeError(_needs_input_message(self._model, self.at) +
                            " (a tail made with method='hooks' re-runs the whole model)")
        calls = 0

        def replace(module: nn.Module, args: Any, output: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise ValueError(f"split: {type(self._model).__name__} calls {self.at!r} more than once "
                                 "in one forward; split at a module it calls once")
            return h

        handle = self._model.get_submodule(self.at).register_forward_hook(replace)
        try:
            result = self._model(*inputs, **kwargs)
        finally:
            handle.remove()
        if not calls:
            raise ValueError(
                f"split: {type(self._model).__name__} ran to its end without calling {self.at!r}")
        return result
