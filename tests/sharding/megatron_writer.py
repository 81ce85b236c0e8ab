"""Write Megatron-LM-style checkpoints of a known shardserve Llama model, for reader tests.

Follows Megatron-LM's own conventions (megatron/training/checkpointing.py and the GPT model's
state dict): latest_checkpointed_iteration.txt, mp_rank_TT[_PPP]/model_optim_rng.pt with
{"model", "args", "checkpoint_version", "iteration"}; QKV grouped per query group; SwiGLU fc1
as [gate shard; up shard] per rank; vocabulary padded to make_vocab_size_divisible_by x TP;
layer numbers local to each pipeline stage; tied embeddings copied to the last stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from shardserve_sharding.models.llama import LlamaConfig


def grouped_qkv(wqkv: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Our [q; k; v] -> Megatron's [for each group: q heads of the group; k; v]."""
    d, g = cfg.head_dim, cfg.n_kv_heads
    qpg = cfg.n_heads // g
    q, k, v = wqkv.split([cfg.n_heads * d, g * d, g * d])
    q = q.view(g, qpg, d, cfg.dim)
    return torch.cat([q, k.view(g, 1, d, cfg.dim), v.view(g, 1, d, cfg.dim)], dim=1).reshape(
        -1, cfg.dim
    )


def write_megatron(
    root: Path,
    state: dict[str, torch.Tensor],
    cfg: LlamaConfig,
    *,
    tp: int,
    pp: int,
    style: str = "core",
    divisible: int = 8,
    iteration: int | None = None,
    norm_spelling: str = "layernorm",
) -> Path:
    """style: 'legacy', 'core' (local spec) or 'te' (Transformer-Engine fused norms)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text(
        "release" if iteration is None else str(iteration)
    )
    it_dir = root / ("release" if iteration is None else f"iter_{iteration:07d}")
    mult = divisible * tp
    padded = -(-cfg.vocab_size // mult) * mult
    args = argparse.Namespace(
        num_layers=cfg.n_layers,
        hidden_size=cfg.dim,
        num_attention_heads=cfg.n_heads,
        group_query_attention=cfg.n_kv_heads != cfg.n_heads,
        num_query_groups=cfg.n_kv_heads,
        ffn_hidden_size=cfg.intermediate_size,
        rotary_base=int(cfg.rope_theta),
        norm_epsilon=cfg.norm_eps,
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=divisible,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        swiglu=True,
        normalization="RMSNorm",
        position_embedding_type="rope",
        add_bias_linear=False,
        rotary_interleaved=False,
    )

    def pad_vocab(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w.new_zeros(padded - w.shape[0], w.shape[1])])

    emb = pad_vocab(state["tok_embeddings.weight"]).chunk(tp)
    out = emb if cfg.tie_embeddings else pad_vocab(state["output.weight"]).chunk(tp)
    per = cfg.n_layers // pp
    for t in range(tp):
        for s in range(pp):
            flat: dict[str, torch.Tensor] = {}
            for local in range(per):
                i = s * per + local
                p = f"layers.{i}."
                qkv = grouped_qkv(state[p + "attention.wqkv.weight"], cfg).chunk(tp)[t]
                gate, up = state[p + "feed_forward.w13.weight"].chunk(2)
                fc1 = torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
                proj = state[p + "attention.wo.weight"].chunk(tp, dim=1)[t]
                fc2 = state[p + "feed_forward.w2.weight"].chunk(tp, dim=1)[t]
                n1, n2 = state[p + "attention_norm.weight"], state[p + "ffn_norm.weight"]
                flat.update(_layer(style, local, qkv, proj, fc1, fc2, n1, n2, norm_spelling))
            model = _assemble(
                style,
                flat,
                t,
                s,
                pp,
                emb[t],
                out[t],
                state["norm.weight"],
                cfg.tie_embeddings,
                norm_spelling,
            )
            name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{s:03d}"
            (it_dir / name).mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": model,
                    "args": args,
                    "checkpoint_version": 3.0,
                    "iteration": iteration or 0,
                },
                it_dir / name / "model_optim_rng.pt",
            )
    return root


def _layer(style, i, qkv, proj, fc1, fc2, n1, n2, spelling):
    c = lambda t: t.clone().contiguous()  # noqa: E731 - own storage per tensor, as saved
    if style == "legacy":
        ln1, ln2 = (
            ("input_layernorm", "post_attention_layernorm")
            if spelling == "layernorm"
            else ("input_norm", "post_attention_norm")
        )
        p = f"layers.{i}."
        return {
            p + f"{ln1}.weight": c(n1),
            p + "self_attention.query_key_value.weight": c(qkv),
            p + "self_attention.dense.weight": c(proj),
            p + f"{ln2}.weight": c(n2),
            p + "mlp.dense_h_to_4h.weight": c(fc1),
            p + "mlp.dense_4h_to_h.weight": c(fc2),
        }
    p = f"decoder.layers.{i}."
    d = {
        p + "self_attention.linear_qkv.weight": c(qkv),
        p + "self_attention.linear_proj.weight": c(proj),
        p + "mlp.linear_fc1.weight": c(fc1),
        p + "mlp.linear_fc2.weight": c(fc2),
    }
    if style == "te":
        d[p + "self_attention.linear_qkv.layer_norm_weight"] = c(n1)
        d[p + "mlp.linear_fc1.layer_norm_weight"] = c(n2)
        for m in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
            "self_attention.core_attention",
        ):
            d[p + m + "._extra_state"] = torch.zeros(0, dtype=torch.uint8)
    else:
        d[p + "input_layernorm.weight"] = c(n1)
        d[p + "pre_mlp_layernorm.weight"] = c(n2)
    return d


def _assemble(style, flat, t, s, pp, emb, out, norm, tied, spelling):
    first, last = s == 0, s == pp - 1
    if style == "legacy":
        lm: dict = {"encoder": dict(flat)}
        if first:
            lm["embedding"] = {"word_embeddings": {"weight": emb.clone()}}
        if last:
            lm["encoder"][f"final_{'layernorm' if spelling == 'layernorm' else 'norm'}.weight"] = (
                norm.clone()
            )
            if not tied:
                lm["output_layer"] = {"weight": out.clone()}
        model = {"language_model": lm}
        if last and tied and pp > 1:
            model["word_embeddings_for_head"] = {"weight": emb.clone()}
        return model
    model = dict(flat)
    if first:
        model["embedding.word_embeddings.weight"] = emb.clone()
    if last:
        model["decoder.final_layernorm.weight"] = norm.clone()
        if not tied or pp > 1:
            model["output_layer.weight"] = out.clone()
    return model
