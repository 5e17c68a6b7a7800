"""A sentence encoder in the shape of ``sentence-transformers/all-MiniLM-L6-v2``, with seeded
random weights, for the real-graph benchmark (bench/bench_real_graphs.py).

The layers are BERT's as Hugging Face's ``BertModel`` writes them in plain torch ops, so the
exported graph has what theirs has: word, position and token-type embeddings summed and
LayerNorm'd; per layer q/k/v ``Linear``s reshaped to 12 heads of 32 with ``view`` on the
hidden states' shape read at run time (``hidden.shape[:-1] + (-1, 32)``, as transformers >= 4.48
writes it), scaled dot-product attention with the padding mask turned into an additive
``finfo.min`` bias, the output projection and an erf GELU feed-forward, each followed by a
residual LayerNorm (post-norm, eps 1e-12); then the mask-weighted mean over tokens
(sentence-transformers' mean pooling). 6 layers, hidden 384, feed-forward 1536, 12 heads,
vocabulary 30522, 512 positions: 22,565,376 parameters, the published model's 22,713,216
less its pooler, which mean pooling does not use.

Inputs ``input_ids`` and ``attention_mask``, int64 ``(N, 128)``, the batch axis dynamic; output
``embedding`` ``(N, 384)``. Weights are random (``torch.manual_seed(seed)`` then BERT's
initialisation: normal(0, 0.02), with LayerNorm scales and shifts drawn around 1 and 0): these
figures are for speed and for what the tool costs, never for accuracy, which needs trained
weights (random matrices have flat singular spectra, trained ones do not).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCABULARY = 30522
HIDDEN = 384
LAYERS = 6
HEADS = 12
FEED_FORWARD = 1536
MAX_POSITIONS = 512
SEQUENCE = 128
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
LAYER_NORM_EPS = 1e-12
# BERT's WordPiece special tokens: padding, [CLS], [SEP]; ordinary words start after 999
PAD_ID, CLS_ID, SEP_ID, FIRST_WORD_ID = 0, 101, 102, 1000
# all-MiniLM-L6-v2's BertModel (22,713,216) less its pooler Linear(384, 384) (147,840)
PUBLISHED_PARAMETERS = 22_713_216 - 147_840


class SelfAttention(nn.Module):
    """BERT's self-attention and its output block (projection, residual, LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.heads, self.head_dim = HEADS, HIDDEN // HEADS
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.output = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        # transformers' BertSelfAttention (4.48 on): shapes read from the hidden states
        input_shape = hidden.shape[:-1]
        head_shape = (*input_shape, -1, self.head_dim)
        q, k, v = (layer(hidden).view(head_shape).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5 + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)
        context = context.reshape(*input_shape, -1).contiguous()
        return self.norm(hidden + self.output(context))


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = SelfAttention()
        self.intermediate = nn.Linear(HIDDEN, FEED_FORWARD)
        self.output = nn.Linear(FEED_FORWARD, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, mask_bias)
        return self.norm(hidden + self.output(F.gelu(self.intermediate(hidden))))


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2's shape: BERT embeddings, 6 post-norm layers, mean pooling."""

    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCABULARY, HIDDEN, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.embedding_norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        hidden = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                  + self.token_type_embeddings(torch.zeros_like(input_ids)))
        hidden = self.embedding_norm(hidden)
        # Hugging Face's extended mask: 0 where attended, the dtype's minimum where padded
        mask = attention_mask[:, None, None, :].to(hidden.dtype)
        mask_bias = (1.0 - mask) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            hidden = layer(hidden, mask_bias)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _initialise(module: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, zero biases), LayerNorms drawn around (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.8, 1.2)
            nn.init.normal_(m.bias, 0.0, 0.05)


def build(seed: int = 0) -> MiniLMEncoder:
    """The encoder with seeded random weights, in eval mode (same seed: same weights)."""
    torch.manual_seed(seed)
    module = MiniLMEncoder()
    _initialise(module)
    return module.eval()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tokens(n: int, seed: int = 0, sequence: int = SEQUENCE) -> dict[str, np.ndarray]:
    """``n`` seeded random tokenised "sentences" as a tokenizer pads them to ``sequence``:
    [CLS], 6 to ``sequence - 2`` word ids, [SEP], then padding (id 0, mask 0). Arrays named as
    the model's inputs, int64 ``(n, sequence)``."""
    if n < 1:
        raise ValueError(f"tokens needs at least one sample, got n={n}")
    rng = np.random.default_rng(seed)
    ids = np.full((n, sequence), PAD_ID, np.int64)
    mask = np.zeros((n, sequence), np.int64)
    lengths = rng.integers(6, sequence - 1, n)  # words per sentence
    for i, words in enumerate(lengths):
        ids[i, 0] = CLS_ID
        ids[i, 1:words + 1] = rng.integers(FIRST_WORD_ID, VOCABULARY, words)
        ids[i, words + 1] = SEP_ID
        mask[i, :words + 2] = 1
    return {"input_ids": ids, "attention_mask": mask}


def export(path: str | Path, seed: int = 0, dynamo: bool = False) -> Path:
    """Write ``build(seed)`` to ``path`` with ``torch.onnx.export`` (TorchScript exporter by
    default, ``dynamo=True`` for the torch.export one), opset 18, the batch axis dynamic."""
    import onnx

    module = build(seed)
    example = tuple(torch.from_numpy(a) for a in tokens(2, seed + 1).values())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(
                module, example, dynamo=True, opset_version=18, input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch}, {0: batch}),
                verbose=False)
            program.save(str(tmp))
        else:
            torch.onnx.export(
                module, example, str(tmp), dynamo=False, opset_version=18,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)})
    proto = onnx.load(str(tmp))
    if proto.ir_version > 10:  # onnxruntime here reads at most 13; the pipeline caps at 10
        proto.ir_version = 10
        onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    count = parameter_count(build())
    print(f"MiniLM-shaped encoder: {count:,} parameters"
          + (" (published: same)" if count == PUBLISHED_PARAMETERS
             else f" (published: {PUBLISHED_PARAMETERS:,})"))
