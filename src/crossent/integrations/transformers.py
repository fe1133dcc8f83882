"""Hugging Face Transformers integration: one line turns a model's loss into crossent's.

::

    import crossent
    import crossent.integrations.transformers as ct

    ct.patch(model, label_smoothing=0.1, z_loss=1e-4, gamma=crossent.flsd53)  # an instance or a class
    Trainer(model=model, args=args, train_dataset=ds).train()   # num_items_in_batch is honoured
    ct.unpatch(model)                                            # the original behaviour, exactly

    with ct.patched(model, label_smoothing=0.1):                 # the context-manager form
        loss = model(input_ids=ids, labels=ids).loss

**Supported versions**: ``transformers >= 4.50, < 6`` (:data:`SUPPORTED_RANGE`; tested with
4.50, 4.57 and 5.24). :func:`patch` raises :class:`UnsupportedVersionError`, naming that range,
for any other installed version. Install with ``pip install crossent[hf]``.

**Options** (keyword arguments of :func:`patch`): every option of :func:`crossent.cross_entropy`
that applies to a model's loss -- ``weight`` (class weights, (C,)), ``ignore_index``,
``label_smoothing``, ``gamma`` (a number or a schedule such as :data:`crossent.flsd53`),
``z_loss``, ``softcap``, ``confidence_penalty``, ``poly1`` -- and ``backend``; ``chunk_size``
(tokens per chunk) applies to the fused path only. The values are checked by crossent when
:func:`patch` is called.

Two routes, chosen by the model's class:

1. **Fused causal LMs** (:data:`FUSED_CAUSAL_LMS`: ``LlamaForCausalLM``, ``MistralForCausalLM``,
   ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``,
   ``Phi3ForCausalLM``, ``GPT2LMHeadModel``). The model's ``forward`` is wrapped. With
   ``labels=None`` (generation, evaluation without labels) the wrapper calls the original forward
   untouched: ``logits_to_keep`` / ``num_logits_to_keep``, caches and every output are the
   family's own. With ``labels`` the wrapper runs the family's own forward (the base model and
   everything around it, with ``labels=None``) while the head (``lm_head``) only records its
   input -- the last hidden states, the full (batch, seq, D) tensor, not a copy -- and returns an
   empty (batch, seq, 0) placeholder, so no logits are ever computed. (The head's ``forward`` is
   a pass-through switch installed as an instance attribute while the model is patched; its
   hooks still run; ``unpatch`` removes it. This also works under ``torch.compile``.) The loss
   is then

   ``crossent.linear_cross_entropy(hidden, lm_head.weight, shifted_labels, bias=lm_head.bias, ...)``

   with the causal shift done on the labels (``labels[..., 1:]`` padded with ``ignore_index`` at
   the end, as Transformers' ``ForCausalLMLoss``; a ``shift_labels`` keyword is used as given),
   so the hidden states are never sliced or copied. Gemma 2 / Gemma 3's
   ``config.final_logit_softcapping`` is passed as crossent's ``softcap`` (read at each call);
   giving ``softcap=`` too for such a model is an error. Everything else the family computes
   (``cache``/``past_key_values``, ``hidden_states``, ``attentions``) is returned as usual, but
   **``logits`` is ``None`` in the output when labels are given** (as Liger-Kernel and Cut
   Cross-Entropy do): call the model without labels to get them.

2. **Every other model whose forward computes its loss through ``model.loss_function``**
   (sequence, token and image classification, question answering, masked LMs, the other causal
   LMs, ...): ``loss_function`` is replaced by :class:`CrossentLossFunction`, which does what
   Transformers' loss of that type does (the causal shift, flattening, QA's clamped positions and
   ``ignore_index``, the choice of ``problem_type``) with :func:`crossent.cross_entropy` and the
   options. The logits are those the model computed (for a causal LM outside the fused families
   too: it keeps its N x V logits). A sequence classifier whose
   ``problem_type`` is regression or multi-label (MSE / BCE in Transformers) is refused.

**Reduction** (both routes), as Transformers defines it: without ``num_items_in_batch`` the mean
over non-ignored tokens (crossent's weighted mean ``sum / sum_i w_{y_i}`` with class weights);
with ``num_items_in_batch`` (which the ``Trainer`` passes under gradient accumulation) the sum
divided by ``num_items_in_batch``, so that the accumulated gradient is that of the mean over the
whole step. With several ranks the ``Trainer`` (``average_tokens_across_devices=True``) already
passes the global count and scales the loss by the number of processes; in a loop of your own
under DDP (which averages the ranks' gradients), pass ``num_items_in_batch = n / world_size``
with ``n`` from :func:`crossent.distributed.global_valid_count` over the step's shifted labels.
The loss is float32 for float32 and half-precision models (accumulation is fp32, as
Transformers' upcast gives), float64 for float64 models (Transformers' own loss is float32
there: it calls ``logits.float()``). Where crossent differs from ``F.cross_entropy`` (a batch
whose labels are all ignored gives 0 instead of NaN) it differs here too.

**With the Trainer**, give the options to :func:`patch`, not ``TrainingArguments(
label_smoothing_factor=...)``: the Trainer's label smoother takes the labels out of the inputs
and computes its loss from the logits, so the model (and crossent) never sees the labels.

**Patching an instance or a class.** ``patch(model)`` sets instance attributes (``forward``, or
``_loss_function`` through Transformers' ``loss_function`` setter); ``patch(SomeClass)`` sets the
class's, so that every instance (also those created later, e.g. by ``from_pretrained``) and
every subclass that does not override ``forward`` is patched. Patching again replaces the
options. :func:`unpatch` puts back exactly what was there before (including a missing
attribute). An instance whose class is patched cannot be patched on its own. A deep copy of a
patched instance is patched on its own. A patched instance cannot be pickled whole
(``torch.save(model)``): save its ``state_dict`` or unpatch first. A PEFT model: patch
``peft_model.get_base_model()``.

**Errors**: a class that neither is a fused family nor computes its loss through
``loss_function`` (a base model without a loss, a model with an inline loss, a loss that is not
a softmax cross-entropy such as object detection or CTC) raises
:class:`UnpatchableModelError` naming the class.

**Auxiliary outputs**: ``patch(model, return_aux=True)`` (fused causal LMs) adds a field
``aux`` to the output object (``out.aux``, ``out["aux"]``, and the last entry of the tuple with
``return_dict=False``): a :class:`crossent.CrossEntropyAux` with the per-token log-sum-exp, the
z-loss term's share of the loss (divided by ``num_items_in_batch`` as the loss is), the token
accuracy and the mean entropy of the prediction, from the same chunked pass as the loss. Other
models refuse ``return_aux`` (their logits are returned: compute it from them).

Not covered here: tensor-/vocabulary-parallel heads (a sharded ``lm_head``). Other causal LMs,
the Mixture-of-Experts families among them (whose router loss the model adds after
``loss_function``), take route 2, unfused. ``Qwen3ForCausalLM`` exists
from Transformers 4.51.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import crossent
from crossent._options import Reduction

__all__ = [
    "FUSED_CAUSAL_LMS",
    "OPTIONS",
    "SUPPORTED_RANGE",
    "CrossentLossFunction",
    "UnpatchableModelError",
    "UnsupportedVersionError",
    "is_patched",
    "patch",
    "patched",
    "unpatch",
]

#: The Transformers versions this integration supports (a PEP 440 version specifier).
SUPPORTED_RANGE = ">=4.50,<6"
_MIN_VERSION = (4, 50)
_MAX_MAJOR_EXCLUSIVE = 6

#: The causal-LM classes patched on the fused path, as Transformers names them, and the config
#: attribute holding the family's final-logit soft-capping (None: the family has none).
FUSED_CAUSAL_LMS: dict[str, str | None] = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "Gemma3ForCausalLM": "final_logit_softcapping",
    "Phi3ForCausalLM": None,
    "GPT2LMHeadModel": None,
}

#: The keyword options of :func:`patch`.
OPTIONS = (
    "weight",
    "ignore_index",
    "label_smoothing",
    "gamma",
    "z_loss",
    "softcap",
    "confidence_penalty",
    "poly1",
    "return_aux",
    "backend",
    "chunk_size",
)

# Keyword arguments of a forward that only its loss reads: taken out before the forward runs.
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
class _Missing:
    """"No attribute here before patching": one object, also through copy/deepcopy/pickle."""

    def __repr__(self) -> str:
        return "<missing>"

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()
_MARK = "_crossent_patch"


class UnsupportedVersionError(RuntimeError):
    """The installed Transformers is outside :data:`SUPPORTED_RANGE`."""


class UnpatchableModelError(TypeError):
    """The model's class has no loss crossent can take over."""


# --------------------------------------------------------------------------------------- checks


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the module is only useful with transformers
        raise ImportError(
            "crossent.integrations.transformers needs Hugging Face Transformers "
            f"({SUPPORTED_RANGE}): pip install 'crossent[hf]'"
        ) from e
    return transformers


def check_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedVersionError` unless ``version`` (default: the installed
    Transformers) is in :data:`SUPPORTED_RANGE`; return it."""
    if version is None:
        version = _transformers().__version__
    m = re.match(r"(\d+)\.(\d+)", version)
    ok = m is not None and (
        (int(m[1]), int(m[2])) >= _MIN_VERSION and int(m[1]) < _MAX_MAJOR_EXCLUSIVE
    )
    if not ok:
        raise UnsupportedVersionError(
            f"crossent.integrations.transformers supports transformers {SUPPORTED_RANGE}; "
            f"transformers {version} is installed (pip install 'transformers{SUPPORTED_RANGE}')"
        )
    return version


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"patch() got unknown option(s) {', '.join(unknown)}; the options are "
            f"{', '.join(OPTIONS)} (class weights are `weight`)"
        )
    opts = dict(options)
    w = opts.get("weight")
    if w is not None and (not isinstance(w, Tensor) or w.ndim != 1):
        raise TypeError("weight (the class weights) must be a 1-D tensor, one weight per class, or None")
    cs = opts.get("chunk_size")
    if cs is not None and (isinstance(cs, bool) or not isinstance(cs, int) or cs < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {cs!r}")
    backend = opts.get("backend", "auto")
    if backend not in ("auto", "native", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'native', 'torch' or 'triton', got {backend!r}")
    # crossent's own checks of the values (and of a gamma schedule), on a 2 x 3 problem
    if not isinstance(opts.get("return_aux", False), bool):
        raise TypeError(f"return_aux must be a bool, got {type(opts['return_aux']).__name__}")
    trial = {k: v for k, v in opts.items() if k not in ("weight", "chunk_size", "backend", "return_aux")}
    with torch.no_grad():
        crossent.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), **trial)
    return opts


# ------------------------------------------------------------------- the loss_function route


class CrossentLossFunction:
    """A replacement of ``model.loss_function``: Transformers' loss of one kind (``"causal"``,
    ``"masked"``, ``"sequence"``, ``"token"`` or ``"qa"``), same arguments and semantics,
    computed by :func:`crossent.cross_entropy` with ``options``."""

    def __init__(self, kind: str, options: dict[str, Any], previous: Any = _MISSING) -> None:
        if kind not in ("causal", "masked", "sequence", "token", "qa"):
            raise ValueError(f"unknown loss kind {kind!r}")
        self.kind = kind
        self.options = dict(options)
        self.previous = previous  # what the patched object held before (restored by unpatch)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"CrossentLossFunction({self.kind!r}{', ' if opts else ''}{opts})"

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor | None:
        return getattr(self, "_" + self.kind)(*args, **kwargs)

    def _ce(
        self,
        logits: Tensor,
        target: Tensor,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int | None = None,
    ) -> Tensor:
        """Transformers' ``fixed_cross_entropy``: a mean, or the sum over ``num_items_in_batch``."""
        opts = {k: v for k, v in self.options.items() if k != "chunk_size"}
        if ignore_index is not None:
            opts["ignore_index"] = ignore_index
        reduction: Reduction = "mean" if num_items_in_batch is None else "sum"
        loss = crossent.cross_entropy(logits, target.to(logits.device), reduction=reduction, **opts)
        return _divide(loss, num_items_in_batch)

    def _ignore_index(self, given: int | None) -> int:
        return int(self.options.get("ignore_index", -100)) if given is None else given

    def _causal(
        self, logits: Tensor, labels: Tensor, vocab_size: int,
        num_items_in_batch: Tensor | int | None = None, ignore_index: int | None = None,
        shift_labels: Tensor | None = None, **kwargs: Any,
    ) -> Tensor:
        ii = self._ignore_index(ignore_index)
        if shift_labels is None:
            shift_labels = _shift(labels, ii)
        return self._masked(logits, shift_labels, vocab_size, num_items_in_batch, ii)

    def _masked(
        self, logits: Tensor, labels: Tensor, vocab_size: int,
        num_items_in_batch: Tensor | int | None = None, ignore_index: int | None = None,
        **kwargs: Any,
    ) -> Tensor:
        ii = self._ignore_index(ignore_index)
        return self._ce(logits.reshape(-1, vocab_size), labels.reshape(-1), num_items_in_batch, ii)

    def _sequence(self, labels: Tensor, pooled_logits: Tensor, config: Any, **kwargs: Any) -> Tensor:
        num_labels = config.num_labels
        if config.problem_type is None:  # as Transformers' ForSequenceClassificationLoss decides it
            if num_labels == 1:
                config.problem_type = "regression"
            elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        if config.problem_type != "single_label_classification":
            raise ValueError(_problem_type_message(config.problem_type))
        return self._ce(pooled_logits.view(-1, num_labels), labels.view(-1), *_reduction_kwargs(kwargs))

    def _token(self, logits: Tensor, labels: Tensor, config: Any, **kwargs: Any) -> Tensor:
        return self._ce(logits.view(-1, config.num_labels), labels.view(-1), *_reduction_kwargs(kwargs))

    def _qa(
        self,
        start_logits: Tensor,
        end_logits: Tensor,
        start_positions: Tensor | None,
        end_positions: Tensor | None,
        **kwargs: Any,
    ) -> Tensor | None:
        if start_positions is None or end_positions is None:
            return None
        if start_positions.ndim > 1:
            start_positions = start_positions.squeeze(-1)
        if end_positions.ndim > 1:
            end_positions = end_positions.squeeze(-1)
        # positions outside the inputs are clamped to the length and ignored, as Transformers does
        ignored = start_logits.size(1)
        nib = kwargs.get("num_items_in_batch")
        start = self._ce(start_logits, start_positions.clamp(0, ignored), nib, ignored)
        end = self._ce(end_logits, end_positions.clamp(0, ignored), nib, ignored)
        return (start + end) / 2


def _problem_type_message(problem_type: str) -> str:
    return (
        f"crossent replaces softmax cross-entropy losses, but this sequence classifier's "
        f"problem_type is {problem_type!r} (Transformers uses "
        f"{'MSELoss' if problem_type == 'regression' else 'BCEWithLogitsLoss'}); unpatch the model, "
        f"or use problem_type='single_label_classification' with num_labels >= 2"
    )


def _reduction_kwargs(kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(num_items_in_batch, ignore_index) from a loss function's keyword arguments (Transformers
    also passes the model's other outputs there, e.g. ``logits=`` beside ``pooled_logits=``)."""
    return kwargs.get("num_items_in_batch"), kwargs.get("ignore_index")


def _divide(loss: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _shift(labels: Tensor, ignore_index: int) -> Tensor:
    """``labels[..., 1:]`` with ``ignore_index`` appended: the target of position t is token t+1."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _loss_type_of_class(cls: type) -> str | None:
    """The ``loss_type`` Transformers' ``PreTrainedModel.__init__`` gives an instance of ``cls``."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    name = cls.__name__
    if name in LOSS_MAPPING:
        return name
    found = re.findall(f"({'|'.join(LOSS_MAPPING)})", name)
    return found[0] if found else None


def _loss_kind(cls: type, model: Any) -> tuple[str | None, str]:
    """(kind, description) of the loss ``model.loss_function`` gives an instance of ``cls``."""
    from transformers.loss import loss_utils as lu

    loss_type = getattr(model, "loss_type", None) if model is not None else _loss_type_of_class(cls)
    fn = lu.LOSS_MAPPING.get(loss_type) if loss_type is not None else None
    if fn is None:  # PreTrainedModel.loss_function's fallback
        fn = lu.LOSS_MAPPING["ForCausalLM"]
    kinds = {
        getattr(lu, "ForCausalLMLoss", None): "causal",
        getattr(lu, "ForMaskedLMLoss", None): "masked",
        getattr(lu, "ForSequenceClassificationLoss", None): "sequence",
        getattr(lu, "ForTokenClassification", None): "token",
        getattr(lu, "ForQuestionAnsweringLoss", None): "qa",
    }
    return kinds.get(fn), f"loss_type={loss_type!r}, {getattr(fn, '__name__', fn)}"


def _computes_loss_through_loss_function(cls: type) -> bool | None:
    """Whether ``cls.forward`` computes its loss through ``self.loss_function``, read from the
    source: the most derived ``forward`` mentions it, or delegates to ``super()`` and the next
    one does (None: no source to read)."""
    for base in cls.__mro__:
        forward = base.__dict__.get("forward")
        if forward is None:
            continue
        state = getattr(forward, _MARK, None)
        forward = state["original"] if state is not None else forward
        try:
            src = inspect.getsource(inspect.unwrap(forward))
        except (OSError, TypeError):
            return None
        if "loss_function" in src:
            return True
        if "super(" not in src:
            return False
    return False


# ------------------------------------------------------------------------------ fused route


def _fused_family(cls: type) -> type | None:
    """The fused-family class ``cls`` runs the forward of (itself or a base), or None."""
    for base in cls.__mro__:
        if base.__name__ in FUSED_CAUSAL_LMS and base.__module__.startswith("transformers."):
            # a subclass that overrides forward is not the family's forward any more
            return base if _plain_forward(cls) is base.__dict__.get("forward") else None
    return None


def _plain_forward(cls: type) -> Any:
    """``cls.forward`` looked up through the MRO, skipping crossent's own patches."""
    for base in cls.__mro__:
        f = base.__dict__.get("forward")
        if f is not None:
            state = getattr(f, _MARK, None)
            return state["original"] if state is not None else f
    return None


class _HeadCapture:
    """Installed as the ``forward`` of a patched model's ``lm_head`` (an instance attribute,
    which ``nn.Module.__call__`` runs): the head's own forward, unchanged, except while the
    patched forward computes a loss -- then it records its input, the last hidden states, and
    returns an empty (..., 0) placeholder instead of the logits. The head's hooks still run.
    It stays installed between calls (a switch, not a swap: nothing is set or deleted on the
    module during a forward, which ``torch.compile`` can trace)."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.previous = vars(head).get("forward", _MISSING)  # put back by unpatch
        own = types.MethodType(type(head).forward, head)
        self.run = self.previous if self.previous is not _MISSING else own
        self.seen: list[Tensor] | None = None

    def __call__(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.seen is None:
            return self.run(hidden, *args, **kwargs)
        self.seen.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))


def _capture_of(head: torch.nn.Module) -> _HeadCapture | None:
    forward = head.forward
    return forward if isinstance(forward, _HeadCapture) else None


@torch.compiler.disable
def _install_capture(head: torch.nn.Module, heads: weakref.WeakSet) -> _HeadCapture:
    capture = _HeadCapture(head)
    head.forward = capture
    heads.add(head)
    return capture


def _remove_captures(heads: weakref.WeakSet) -> None:
    for head in list(heads):
        capture = vars(head).get("forward")
        if isinstance(capture, _HeadCapture):
            if capture.previous is _MISSING:
                del head.forward
            else:
                head.forward = capture.previous
    heads.clear()


def _param_index(forward: Callable[..., Any], name: str) -> int | None:
    """Position of parameter ``name`` among the positional arguments after ``self``."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) - 1 if name in positional else None


def _passed_at(at: int | None, name: str, args: list[Any], kwargs: dict[str, Any]) -> int | None:
    """``at`` (from :func:`_param_index`) when argument ``name`` was passed positionally, else None."""
    return at if at is not None and name not in kwargs and len(args) > at else None


def _make_fused_forward(
    original: Callable[..., Any],
    call: Callable[..., Any],
    options: dict[str, Any],
    softcap_attr: str | None,
    heads: weakref.WeakSet,
) -> Callable[..., Any]:
    """The patched forward: ``call(self, *args, **kwargs)`` runs the unpatched one; ``heads``
    collects the heads it installs a :class:`_HeadCapture` on (removed by :func:`unpatch`)."""
    labels_at = _param_index(original, "labels")
    return_dict_at = _param_index(original, "return_dict")
    user_softcap = options.get("softcap")
    base_ii = int(options.get("ignore_index", -100))
    lce_options = {k: v for k, v in options.items() if k not in ("weight", "ignore_index", "softcap")}
    if options.get("weight") is not None:
        lce_options["class_weight"] = options["weight"]

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        args_l = list(args)
        labels_pos = _passed_at(labels_at, "labels", args_l, kwargs)
        labels = args_l[labels_pos] if labels_pos is not None else kwargs.get("labels")
        if labels is None:
            return call(self, *args, **kwargs)  # generation / no loss: the family's forward as is
        if labels_pos is not None:
            args_l[labels_pos] = None
        else:
            kwargs["labels"] = None
        loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
        rd_pos = _passed_at(return_dict_at, "return_dict", args_l, kwargs)
        return_dict = args_l[rd_pos] if rd_pos is not None else kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if not return_dict:  # ask for the output object, made a tuple at the end
            if rd_pos is not None:
                args_l[rd_pos] = True
            else:
                kwargs["return_dict"] = True

        head = self.lm_head
        capture = _capture_of(head)
        if capture is None:
            capture = _install_capture(head, heads)
        seen: list[Tensor] = []
        capture.seen = seen  # the head records its input and computes nothing while set
        try:
            out = call(self, *args_l, **kwargs)
        finally:
            capture.seen = None
        if len(seen) != 1:
            raise RuntimeError(
                f"{type(self).__name__}: lm_head was called {len(seen)} times in one forward; "
                "crossent's fused loss expects exactly one call"
            )
        if isinstance(out, tuple):
            raise RuntimeError(f"{type(self).__name__}.forward returned a tuple with return_dict=True")
        hidden = seen[0]
        weight, bias = head.weight, head.bias
        if hidden.device != weight.device:
            hidden = hidden.to(weight.device)
        ii = loss_kwargs.get("ignore_index", base_ii)
        target = loss_kwargs.get("shift_labels")
        if target is None:
            target = _shift(labels, ii)
        softcap = user_softcap
        model_cap = getattr(self.config, softcap_attr, None) if softcap_attr else None
        if model_cap is not None:
            if user_softcap is not None:
                raise ValueError(
                    f"{type(self).__name__} soft-caps its logits (config.{softcap_attr}={model_cap}), "
                    f"which crossent applies; do not also pass softcap={user_softcap}"
                )
            softcap = float(model_cap)
        nib = loss_kwargs.get("num_items_in_batch")
        loss = crossent.linear_cross_entropy(
            hidden,
            weight,
            target.to(hidden.device),
            bias=bias,
            ignore_index=ii,
            softcap=softcap,
            reduction="mean" if nib is None else "sum",
            **lce_options,
        )
        aux = None
        if isinstance(loss, tuple):  # return_aux=True
            loss, aux = loss
            aux = aux._replace(z_loss=_divide(aux.z_loss, nib))  # the loss's share, as the loss
        loss = _divide(loss, nib)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        result = type(out)(loss=loss, **fields)  # logits=None: they were never computed
        if aux is not None:
            result["aux"] = aux  # a new field of the output: result.aux, result["aux"]
        return result if return_dict else result.to_tuple()

    return forward


# ------------------------------------------------------------------------------ patch / unpatch


def _check_model_type(obj: Any) -> None:
    from transformers import PreTrainedModel

    cls = obj if isinstance(obj, type) else type(obj)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        hint = ""
        if hasattr(obj, "get_base_model"):
            hint = " (a PEFT model: patch model.get_base_model())"
        raise TypeError(
            f"patch() takes a transformers PreTrainedModel instance or subclass, got {cls.__name__}{hint}"
        )


def _route(cls: type, model: Any) -> tuple[str, Any]:
    """("fused", softcap attribute) or ("loss", kind); raise for a class with no such loss."""
    family = _fused_family(cls)
    if family is not None:
        if model is not None and not isinstance(getattr(model, "lm_head", None), torch.nn.Module):
            raise UnpatchableModelError(f"{cls.__name__} has no lm_head; crossent cannot patch it")
        return "fused", FUSED_CAUSAL_LMS[family.__name__]
    through = _computes_loss_through_loss_function(cls)
    kind, what = _loss_kind(cls, model)
    loss_type = getattr(model, "loss_type", None) if model is not None else _loss_type_of_class(cls)
    if through is False or (through is None and loss_type is None):
        raise UnpatchableModelError(
            f"{cls.__name__} cannot be patched by crossent: it is not one of the fused causal LMs "
            f"({', '.join(FUSED_CAUSAL_LMS)}) and its forward does not compute a loss through "
            "model.loss_function"
        )
    if kind is None:
        raise UnpatchableModelError(
            f"{cls.__name__} cannot be patched by crossent: its loss ({what}) is not a softmax "
            "cross-entropy that crossent.cross_entropy replaces"
        )
    if kind == "sequence" and model is not None:
        pt, n = model.config.problem_type, model.config.num_labels
        if pt in ("regression", "multi_label_classification") or (pt is None and n == 1):
            raise UnpatchableModelError(
                f"{cls.__name__}: " + _problem_type_message(pt or "regression")
            )
    return "loss", kind


def _check_aux_route(cls: type, route: str, opts: dict[str, Any]) -> None:
    if opts.get("return_aux") and route != "fused":
        raise ValueError(
            f"return_aux applies to the fused causal LMs ({', '.join(FUSED_CAUSAL_LMS)}); "
            f"{cls.__name__} keeps its logits: compute them with "
            "crossent.cross_entropy(logits, labels, return_aux=True)"
        )


def _state(obj: Any) -> dict[str, Any]:
    """What crossent installed on ``obj`` itself (a class or an instance): {"forward": ...,
    "loss": ...}, each present when patched."""
    d = obj.__dict__ if isinstance(obj, type) else vars(obj)
    found: dict[str, Any] = {}
    f = d.get("forward")
    fn = f.__func__ if isinstance(f, types.MethodType) else f
    if getattr(fn, _MARK, None) is not None:
        found["forward"] = getattr(fn, _MARK)
    lf = d.get("_loss_function")
    if isinstance(lf, CrossentLossFunction):
        found["loss"] = lf
    return found


def is_patched(model_or_class: Any) -> bool:
    """Whether crossent patched this instance or class itself (an instance whose class is patched:
    ``is_patched(type(model))``)."""
    return bool(_state(model_or_class))


def _patched_class(model: Any) -> type | None:
    for base in type(model).__mro__:
        if _state(base):
            return base
    return None


def patch(model_or_class: Any, **options: Any) -> Any:
    """Make crossent compute the loss of a Transformers model (an instance or a class).

    See the module docstring for the routes, the options and what changes in the outputs.
    Returns ``model_or_class``. Raises :class:`UnsupportedVersionError` for a Transformers
    version outside :data:`SUPPORTED_RANGE`, :class:`UnpatchableModelError` for a class with no
    loss crossent can take over, ``TypeError`` / ``ValueError`` for bad options.
    """
    check_version()
    _check_model_type(model_or_class)
    opts = _check_options(options)
    if isinstance(model_or_class, type):
        cls: type[Any] = model_or_class
        if is_patched(cls):
            unpatch(cls)
        route, arg = _route(cls, None)
        _check_aux_route(cls, route, opts)
        if route == "fused":
            original = cls.__dict__.get("forward", _MISSING)
            unpatched = cls.forward
            heads: weakref.WeakSet = weakref.WeakSet()  # each instance's head gets its capture on first use
            fwd = _make_fused_forward(unpatched, unpatched, opts, arg, heads)
            state = {"previous": original, "original": unpatched, "options": opts, "heads": heads}
            setattr(fwd, _MARK, state)
            cls.forward = fwd
        else:
            cls._loss_function = CrossentLossFunction(arg, opts, cls.__dict__.get("_loss_function", _MISSING))
        return cls

    model = model_or_class
    owner = _patched_class(model)
    if owner is not None:
        raise ValueError(
            f"{type(model).__name__} is patched through its class {owner.__name__}; "
            f"unpatch({owner.__name__}) first to patch this instance on its own"
        )
    if is_patched(model):
        unpatch(model)
    cls = type(model)
    route, arg = _route(cls, model)
    _check_aux_route(cls, route, opts)
    if route == "fused":
        d = vars(model)
        previous = d.get("forward", _MISSING)
        if previous is _MISSING:
            unpatched = cls.forward
            call = unpatched
        else:  # an instance-level forward already (e.g. a hook): run it as it is
            unpatched = previous

            def call(self: Any, *a: Any, _prev: Any = previous, **k: Any) -> Any:
                return _prev(*a, **k)

        heads = weakref.WeakSet()
        fwd = _make_fused_forward(cls.forward, call, opts, arg, heads)
        setattr(fwd, _MARK, {"previous": previous, "original": unpatched, "options": opts, "heads": heads})
        _install_capture(model.lm_head, heads)
        model.forward = types.MethodType(fwd, model)
    else:
        previous = vars(model).get("_loss_function", _MISSING)
        model.loss_function = CrossentLossFunction(arg, opts, previous)  # the property's setter
    return model


def unpatch(model_or_class: Any) -> Any:
    """Undo :func:`patch`: put back exactly what the instance or class held before. A no-op for
    an object crossent did not patch; an instance patched only through its class raises
    ``ValueError`` (unpatch the class). Returns ``model_or_class``."""
    obj = model_or_class
    state = _state(obj)
    if not state:
        owner = None if isinstance(obj, type) else _patched_class(obj)
        if owner is not None:
            raise ValueError(
                f"{type(obj).__name__} is patched through its class {owner.__name__}: "
                f"unpatch({owner.__name__})"
            )
        return obj
    if "forward" in state:
        previous = state["forward"]["previous"]
        if previous is _MISSING:
            delattr(obj, "forward")
        else:
            obj.forward = previous
        heads = state["forward"]["heads"]
        if not isinstance(obj, type) and isinstance(getattr(obj, "lm_head", None), torch.nn.Module):
            heads.add(obj.lm_head)  # (a deep copy of a patched model has its own head)
        _remove_captures(heads)
    if "loss" in state:
        previous = state["loss"].previous
        if previous is _MISSING:
            delattr(obj, "_loss_function")
        else:
            obj._loss_function = previous
    return obj


@contextlib.contextmanager
def patched(model_or_class: Any, **options: Any) -> Iterator[Any]:
    """``with patched(model, label_smoothing=0.1) as m:`` -- :func:`patch` on entry,
    :func:`unpatch` on exit (also on an exception)."""
    patch(model_or_class, **options)
    try:
        yield model_or_class
    finally:
        unpatch(model_or_class)
