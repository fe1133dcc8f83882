"""crossent.integrations.transformers: patched Transformers models against the unpatched ones.

Every model is built from a tiny random config (nothing is downloaded), in float64 (float32 only
where the installed Transformers' code of the family cannot run in float64: GPT-2 in 4.50).
Transformers' own loss upcasts the logits to float32 (``logits.float()``), so the unpatched
model's loss is a float32 number even for a float64 model: the patched loss and gradients are
compared tightly (1e-10 relative) with a reference computed in the model's dtype from the
unpatched model's own logits, and to float32 tolerance with the unpatched model's ``labels=`` loss.
Torch runs one thread per test process: with these tiny models that is the fastest.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import crossent  # noqa: E402
import crossent.integrations.transformers as ct  # noqa: E402

T = transformers
V = 96  # vocabulary
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, Any] = {
    "llama": lambda **kw: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, **kw)),
    "mistral": lambda **kw: T.MistralForCausalLM(T.MistralConfig(**SMALL, **kw)),
    "qwen2": lambda **kw: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, **kw)),
    "qwen3": lambda **kw: T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, head_dim=8, **kw)),
    "gemma2": lambda **kw: T.Gemma2ForCausalLM(T.Gemma2Config(**SMALL, head_dim=8, **kw)),
    "gemma3": lambda **kw: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**SMALL, head_dim=8, **kw)),
    "phi3": lambda **kw: T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **kw)),
    "gpt2": lambda **kw: T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    ),
}
# (family, config overrides): Gemma 2 / 3 with and without the final-logit soft-capping
CASES = [
    ("llama", {}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma2", {"final_logit_softcapping": 3.0}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma3", {"final_logit_softcapping": 3.0}),
    ("gemma3", {"final_logit_softcapping": None}),
    ("phi3", {}),
    ("gpt2", {}),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models: one thread per test process is faster than two (and xdist runs two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# the class each family needs (Qwen3 arrived in Transformers 4.51)
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def build(family: str, seed: int = 0, **overrides: Any) -> Any:
    """The family's model from a tiny config, in float64 where the family's forward allows it
    (older GPT-2 code builds its attention mask in float32 and overflows), else float32."""
    if not hasattr(T, CLASSES[family]):
        pytest.skip(f"transformers {T.__version__} has no {CLASSES[family]}")
    torch.manual_seed(seed)
    model = FAMILIES[family](**overrides).eval()
    model.config.use_cache = False
    try:
        with torch.no_grad():
            ids, mask = torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]])
            model.to(torch.float64)(input_ids=ids, attention_mask=mask)
    except RuntimeError:
        model.to(torch.float32)
    return model


def tol(model: Any, f64: float, f32: float) -> dict[str, float]:
    """Relative tolerance for the model's dtype (atol 0)."""
    return {"rtol": f64 if model.dtype == torch.float64 else f32, "atol": 0.0}


def batch(seed: int = 1, B: int = 3, L: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of different lengths: input ids, attention mask, labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for i, n in enumerate([L, L - 4, L - 7][:B]):
        mask[i, n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # an ignored token inside a row too
    return ids, mask, labels


def grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, **ce: Any):
    """Loss and gradients from the unpatched model's materialised logits, in the model's dtype."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == model.dtype
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), **ce)
    loss.backward()
    g = grads(model)
    model.zero_grad()
    return loss.detach(), g


def assert_grads_close(got: dict, want: dict, **tol: Any) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}", **tol)


# --------------------------------------------------------------------- fused causal LMs


@pytest.mark.parametrize(("family", "overrides"), CASES, ids=[f"{f}-{o}" for f, o in CASES])
def test_fused_family_matches_unpatched(family: str, overrides: dict) -> None:
    model = build(family, **overrides)
    ids, mask, labels = batch()
    # the unpatched model's own loss (Transformers computes it in float32)
    model.zero_grad()
    hf = model(input_ids=ids, attention_mask=mask, labels=labels)
    hf.loss.backward()
    hf_grads = grads(model)
    want, want_grads = reference(model, ids, mask, labels)
    torch.testing.assert_close(want, hf.loss.to(want.dtype), rtol=1e-6, atol=0)
    exact = tol(model, 1e-10, 1e-5)
    g_tol = {"rtol": 1e-9, "atol": 1e-12} if model.dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}

    heads: list[torch.Size] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: heads.append(o.shape))
    ct.patch(model)
    try:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None  # never materialised: the head returned an empty placeholder
        assert heads == [torch.Size((*ids.shape, 0))]
        assert out.loss.dtype == model.dtype
        torch.testing.assert_close(out.loss, want, **exact)
        torch.testing.assert_close(out.loss, hf.loss.to(want.dtype), rtol=1e-5, atol=0)
        out.loss.backward()
        got = grads(model)
        assert_grads_close(got, want_grads, **g_tol)  # every parameter, head included
        assert_grads_close(got, hf_grads, rtol=1e-4, atol=1e-6)

        # num_items_in_batch: the sum over the given count (Transformers' definition)
        n_valid = int((labels[:, 1:] != -100).sum())
        nib = torch.tensor(7)
        sum_ = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=nib).loss
        torch.testing.assert_close(sum_, want * n_valid / 7, **exact)
        # labels given positionally, and a shift_labels keyword (used as given)
        names = [n for n in inspect.signature(type(model).forward).parameters if n != "self"]
        at = names.index("labels")
        args = [None] * (at + 1)
        args[0], args[names.index("attention_mask")], args[at] = ids, mask, labels
        torch.testing.assert_close(model(*args).loss, want, **exact)
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        shifted[1, 0] = -100
        got = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted).loss
        other, _ = reference(model, ids, mask, torch.cat([labels[:, :1], shifted], 1)[:, :-1])
        torch.testing.assert_close(got, other, **exact)
        # return_dict=False: a tuple, loss first
        tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        assert isinstance(tup, tuple)
        torch.testing.assert_close(tup[0], want, **exact)
    finally:
        ct.unpatch(model)
        hook.remove()
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)


def test_options_label_smoothing_and_every_option() -> None:
    model = build("llama")
    ids, mask, labels = batch()
    want, want_grads = reference(model, ids, mask, labels, label_smoothing=0.1)
    with ct.patched(model, label_smoothing=0.1):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=0)
        out.loss.backward()
        assert_grads_close(grads(model), want_grads, rtol=1e-9, atol=1e-12)
    model.zero_grad()

    # every option at once, on a soft-capped Gemma 2, against crossent.cross_entropy on the
    # unpatched model's logits (whose soft-capping Transformers applied)
    gemma = build("gemma2", final_logit_softcapping=3.0)
    w = torch.rand(V, dtype=torch.float64) + 0.5
    opts = dict(weight=w, label_smoothing=0.05, gamma=crossent.flsd53, z_loss=1e-3,
                confidence_penalty=0.1, poly1=0.5)
    logits = gemma(input_ids=ids, attention_mask=mask).logits
    want = crossent.cross_entropy(logits[:, :-1], labels[:, 1:], class_dim=-1, backend="torch", **opts)
    want.backward()
    want_grads = grads(gemma)
    gemma.zero_grad()
    with ct.patched(gemma, **opts):
        out = gemma(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.loss, want.detach(), rtol=1e-10, atol=0)
        out.loss.backward()
        assert_grads_close(grads(gemma), want_grads, rtol=1e-8, atol=1e-12)
        with pytest.raises(ValueError, match="soft-caps its logits"):
            ct.patch(gemma, softcap=10.0)
            gemma(input_ids=ids, labels=labels)
    # a softcap option on a family without one is crossent's softcap
    with ct.patched(model, softcap=2.0):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logits = model(input_ids=ids, attention_mask=mask).logits
    want = crossent.cross_entropy(logits[:, :-1], labels[:, 1:], class_dim=-1, softcap=2.0)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_return_aux_on_the_output(family: str) -> None:
    """patch(return_aux=True): out.aux equals the quantities from the unpatched model's logits,
    for the mean and for the Trainer's num_items_in_batch; the tuple form ends with it."""
    model = build(family, **({"final_logit_softcapping": 3.0} if family == "gemma2" else {}))
    ids, mask, labels = batch()
    logits = model(input_ids=ids, attention_mask=mask).logits.detach()
    _, want = crossent.cross_entropy(logits[:, :-1], labels[:, 1:], class_dim=-1, z_loss=1e-3,
                                     return_aux=True)
    with ct.patched(model, z_loss=1e-3, return_aux=True):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        nib = int((labels[:, 1:] != -100).sum()) * 2
        out2 = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=nib)
        as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out.aux, crossent.CrossEntropyAux) and out["aux"] is out.aux
    assert isinstance(as_tuple[-1], crossent.CrossEntropyAux)
    torch.testing.assert_close(out.aux.lse[:, :-1], want.lse)
    assert torch.equal(out.aux.lse[:, -1], torch.zeros(ids.shape[0], dtype=out.aux.lse.dtype))
    for name in ("z_loss", "accuracy", "entropy"):
        torch.testing.assert_close(getattr(out.aux, name), getattr(want, name))
    n = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(out2.aux.z_loss, want.z_loss * n / nib)
    with pytest.raises(ValueError, match="return_aux applies to the fused"):
        ct.patch(T.LlamaForSequenceClassification(T.LlamaConfig(**SMALL, num_labels=3)), return_aux=True)


def test_generation_and_logits_unchanged() -> None:
    model = build("llama")
    model.config.use_cache = True
    ids, _, _ = batch(B=1, L=6)
    before = model(input_ids=ids).logits
    last = model(input_ids=ids, logits_to_keep=1).logits
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    with ct.patched(model):
        assert torch.equal(model(input_ids=ids).logits, before)
        assert torch.equal(model(input_ids=ids, logits_to_keep=1).logits, last)
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, gen)
    assert got.shape[1] == ids.shape[1] + 8


def test_unpatch_restores_exactly() -> None:
    model = build("qwen2")
    ids, mask, labels = batch()
    before_dict = set(vars(model))
    before = model(input_ids=ids, attention_mask=mask, labels=labels)
    ct.patch(model, label_smoothing=0.2)
    ct.patch(model, z_loss=1e-2)  # patching again replaces the options
    assert ct.is_patched(model)
    assert "forward" in vars(model)
    ct.unpatch(model)
    assert not ct.is_patched(model) and set(vars(model)) == before_dict
    assert model.forward.__func__ is type(model).forward
    after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.loss, before.loss) and torch.equal(after.logits, before.logits)
    ct.unpatch(model)  # a no-op on an unpatched model

    # an instance-level forward that was there before (a hook, say) comes back, and is called
    calls = []
    original = model.forward

    def hooked(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return original(*a, **k)

    model.forward = hooked
    with ct.patched(model):
        model(input_ids=ids, attention_mask=mask, labels=labels)
        model(input_ids=ids)
    assert vars(model)["forward"] is hooked and len(calls) == 2
    assert "forward" not in vars(model.lm_head)
    del model.forward

    # a deep copy of a patched model is patched on its own (its forward and head are its own)
    ct.patch(model, label_smoothing=0.2)
    twin = copy.deepcopy(model)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask, labels=labels).loss, want)
    ct.unpatch(twin)
    assert not ct.is_patched(twin) and "forward" not in vars(twin.lm_head)
    assert twin(input_ids=ids, attention_mask=mask, labels=labels).logits is not None
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss, want)
    ct.unpatch(model)
    assert set(vars(model)) == before_dict and "forward" not in vars(model.lm_head)

    # the class form: instances created later are patched; unpatch puts the class back
    cls = T.MistralForCausalLM
    own = cls.__dict__["forward"]
    ct.patch(cls, label_smoothing=0.1)
    try:
        m = build("mistral")
        assert ct.is_patched(cls) and not ct.is_patched(m)
        assert inspect.signature(cls.forward) == inspect.signature(own)
        want, _ = reference(m, ids, mask, labels, label_smoothing=0.1)
        torch.testing.assert_close(m(input_ids=ids, attention_mask=mask, labels=labels).loss, want)
        with pytest.raises(ValueError, match="patched through its class MistralForCausalLM"):
            ct.patch(m)
        with pytest.raises(ValueError, match="unpatch\\(MistralForCausalLM\\)"):
            ct.unpatch(m)
        assert "forward" in vars(m.lm_head)  # its head's capture switch, installed on first use
    finally:
        ct.unpatch(cls)
    assert cls.__dict__["forward"] is own and "forward" not in vars(m.lm_head)
    assert m(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


# --------------------------------------------------------------------- Trainer, accumulation


class _Data(torch.utils.data.Dataset):
    """Variable-length sequences of a toy copy task (each row repeats its first half)."""

    def __init__(self, n: int = 160, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            half = int(torch.randint(2, 9, (1,), generator=g))
            first = torch.randint(3, V, (half,), generator=g)
            self.rows.append(torch.cat([first, first]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n] = r["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class _Recording(T.Trainer):
    """Records each micro-batch's inputs, loss and num_items_in_batch."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.seen: list[tuple[dict, float, Any]] = []

    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.seen.append(({k: v.clone() for k, v in inputs.items()}, float(loss), num_items_in_batch))
        return loss


def _train(model: Any, tmp_path: Any, steps: int = 20) -> _Recording:
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=steps, learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = _Recording(model=model, args=args, train_dataset=_Data(), data_collator=_collate)
    trainer.train()
    return trainer


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainer_gradient_accumulation(family: str, tmp_path: Any) -> None:
    base = build(family).train()
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    ct.patch(fused)
    t_plain = _train(plain, tmp_path / "plain")
    t_fused = _train(fused, tmp_path / "fused")
    assert t_plain.model_accepts_loss_kwargs and t_fused.model_accepts_loss_kwargs

    def curve(t: _Recording) -> torch.Tensor:
        losses = torch.tensor([loss for _, loss, _ in t.seen], dtype=torch.float64)
        return losses.view(-1, 2).sum(1)  # one number per optimizer step (2 micro-batches)

    assert len(t_fused.seen) == 40
    torch.testing.assert_close(curve(t_fused), curve(t_plain), **tol(base, 2e-5, 1e-4))
    assert curve(t_fused)[-5:].mean() < curve(t_fused)[:5].mean()  # it learns
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)  # Adam on float32-level grad differences

    # num_items_in_batch honoured: the step's loss is the mean over all its valid targets
    (b0, l0, n0), (b1, l1, n1) = t_fused.seen[:2]
    assert n0 is not None and int(n0) == int(n1)
    total = 0.0
    with torch.no_grad():
        for b in (b0, b1):
            logits = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            tgt = b["labels"][:, 1:].reshape(-1)
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, V), tgt, reduction="sum"))
    torch.testing.assert_close(l0 + l1, total / float(n0), **tol(base, 1e-9, 1e-5))
    # the Trainer counts the shifted targets for a loss_type=ForCausalLM model (GPT2LMHeadModel has
    # loss_type None, so it counts every label: the same count in both runs, and crossent uses it)
    # (the Trainer counts the labels != -100: of labels[..., 1:] for a loss_type=ForCausalLM model
    # in recent versions, of all the labels otherwise; the same count in both runs)
    shifted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in (b0, b1))
    full = sum(int((b["labels"] != -100).sum()) for b in (b0, b1))
    assert int(n0) in (shifted, full)


# --------------------------------------------------------------------- loss_function route


def _tiny_llama_config(**kw: Any) -> Any:
    return T.LlamaConfig(**SMALL, **kw)


def test_sequence_classification_loss_function() -> None:
    torch.manual_seed(0)
    model = T.LlamaForSequenceClassification(_tiny_llama_config(num_labels=5)).double().eval()
    ids, mask, _ = batch()
    y = torch.tensor([0, 3, 4])
    plain = model(input_ids=ids, attention_mask=mask, labels=y)
    ct.patch(model, label_smoothing=0.1, gamma=2.0)
    assert isinstance(model.loss_function, ct.CrossentLossFunction)
    out = model(input_ids=ids, attention_mask=mask, labels=y)
    assert out.logits is not None
    want = crossent.focal_loss(out.logits.detach(), y, gamma=2.0, label_smoothing=0.1, backend="torch")
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=0)
    # this head does not hand num_items_in_batch to its loss_function: a mean, as in Transformers
    # (and before 4.53 or so its forward does not take the keyword at all)
    params = inspect.signature(type(model).forward).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        n = model(input_ids=ids, attention_mask=mask, labels=y, num_items_in_batch=torch.tensor(6)).loss
        torch.testing.assert_close(n, want, rtol=1e-10, atol=0)
    loss_fn = model.loss_function
    torch.testing.assert_close(
        loss_fn(labels=y, pooled_logits=out.logits, config=model.config, num_items_in_batch=6),
        want * 3 / 6, rtol=1e-10, atol=0,
    )
    ct.unpatch(model)
    assert "_loss_function" not in vars(model)
    again = model(input_ids=ids, attention_mask=mask, labels=y)
    assert torch.equal(again.loss, plain.loss)

    # plain options give Transformers' loss; token classification and QA route the same way
    tok = T.LlamaForTokenClassification(_tiny_llama_config(num_labels=4)).double().eval()
    y_tok = torch.randint(0, 4, ids.shape).masked_fill(mask == 0, -100)
    want = tok(input_ids=ids, attention_mask=mask, labels=y_tok).loss
    with ct.patched(tok):
        torch.testing.assert_close(tok(input_ids=ids, attention_mask=mask, labels=y_tok).loss, want.double())
    qa = T.LlamaForQuestionAnswering(_tiny_llama_config()).double().eval()
    pos = dict(start_positions=torch.tensor([1, 50, 3]), end_positions=torch.tensor([4, 5, 6]))
    want = qa(input_ids=ids, attention_mask=mask, **pos).loss
    with ct.patched(qa):
        torch.testing.assert_close(qa(input_ids=ids, attention_mask=mask, **pos).loss, want.double())

    # a causal LM outside the fused families goes through loss_function (logits materialised)
    torch.manual_seed(0)
    neox = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64)).double().eval()
    _, _, labels = batch()
    logits = neox(input_ids=ids, attention_mask=mask).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    with ct.patched(neox, label_smoothing=0.1):
        out = neox(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out.logits, torch.Tensor)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=0)

    # a fused family's subclass whose forward delegates to super() takes this route too; one with
    # a loss of its own cannot be patched
    class Delegating(T.LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return super().forward(*args, **kwargs)

    class OwnLoss(T.LlamaForCausalLM):
        def forward(self, input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Any:
            return T.modeling_outputs.CausalLMOutputWithPast(loss=torch.zeros(()))

    torch.manual_seed(0)
    sub = Delegating(_tiny_llama_config()).double().eval()
    logits = sub(input_ids=ids, attention_mask=mask).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    with ct.patched(sub, label_smoothing=0.1):
        assert isinstance(sub.loss_function, ct.CrossentLossFunction) and "forward" not in vars(sub)
        torch.testing.assert_close(sub(input_ids=ids, attention_mask=mask, labels=labels).loss, want)
    with pytest.raises(ct.UnpatchableModelError, match="OwnLoss cannot be patched"):
        ct.patch(OwnLoss)

    # the class form
    ct.patch(T.LlamaForSequenceClassification, label_smoothing=0.1)
    try:
        assert isinstance(model.loss_function, ct.CrossentLossFunction)
        want = crossent.cross_entropy(plain.logits.detach(), y, label_smoothing=0.1)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=y).loss, want)
    finally:
        ct.unpatch(T.LlamaForSequenceClassification)
    assert "_loss_function" not in vars(T.LlamaForSequenceClassification)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, labels=y).loss, plain.loss)


# --------------------------------------------------------------------- errors


def test_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    with pytest.raises(ct.UnpatchableModelError, match="LlamaModel cannot be patched"):
        ct.patch(T.LlamaModel(_tiny_llama_config()))
    with pytest.raises(ct.UnpatchableModelError, match="Wav2Vec2ForCTC"):
        ct.patch(T.Wav2Vec2ForCTC)
    reg = T.LlamaForSequenceClassification(_tiny_llama_config(num_labels=1))
    with pytest.raises(ct.UnpatchableModelError, match="regression"):
        ct.patch(reg)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ct.patch(torch.nn.Linear(2, 2))
    model = build("llama")
    with pytest.raises(TypeError, match=r"unknown option.*class_weight"):
        ct.patch(model, class_weight=torch.ones(V))
    with pytest.raises(ValueError, match="label_smoothing"):
        ct.patch(model, label_smoothing=1.5)
    assert not ct.is_patched(model)

    with pytest.raises(ct.UnsupportedVersionError, match=r"transformers >=4\.50,<6; transformers 6\.0\.0"):
        ct.check_version("6.0.0")
    # (importing some model classes replaces sys.modules["transformers"]: patch the current one)
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "4.44.2")
    with pytest.raises(ct.UnsupportedVersionError, match=r"supports transformers >=4\.50,<6.*4\.44\.2"):
        ct.patch(model)
    assert ct.check_version("4.50.0") == "4.50.0" and ct.check_version("5.99.1")
