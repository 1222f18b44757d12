"""Upstream side of bench/upstream_hstu.py (not a test): small research-HSTU checkpoints built, trained a few
steps and saved by generative-recommenders' own classes (research/, checked at 2e81fab), the way
research/trainer/train.py does, with the outputs its eval computes stored beside them.

    HSTU_PYTHON bench/upstream_hstu_build.py GR_REPO OUT

HSTU_PYTHON: an interpreter with torch, gin-config and pandas. torch.ops.fbgemm's three jagged operators
come from bench/fbgemm_shim.py (fbgemm-gpu-cpu does not load on torch 2.13). Writes OUT/work/sasrec_format.csv,
OUT/ckpts/ml-1m-l12/HSTU-...(train.py's name) and OUT/{tag}_reference.pt (torch.save of plain containers).
"""

import math
import os
import random
import sys
from datetime import date

REPO, OUT = sys.argv[1], os.path.abspath(sys.argv[2])

sys.path.insert(0, REPO)  # a generative-recommenders checkout: generative_recommenders/research
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fbgemm_shim  # noqa: F401,E402  (torch.ops.fbgemm.* stand-ins; fbgemm-gpu-cpu does not load on torch 2.13)

import gin  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from generative_recommenders.research.data.dataset import DatasetV2  # noqa: E402
from generative_recommenders.research.data.eval import eval_metrics_v2_from_tensors, get_eval_state  # noqa: E402
from generative_recommenders.research.indexing.utils import get_top_k_module  # noqa: E402
from generative_recommenders.research.modeling.sequential.autoregressive_losses import LocalNegativesSampler  # noqa
from generative_recommenders.research.modeling.sequential.embedding_modules import LocalEmbeddingModule  # noqa
from generative_recommenders.research.modeling.sequential.encoder_utils import get_sequential_encoder  # noqa
from generative_recommenders.research.modeling.sequential.features import movielens_seq_features_from_row  # noqa
from generative_recommenders.research.modeling.sequential.input_features_preprocessors import (  # noqa
    LearnablePositionalEmbeddingInputFeaturesPreprocessor,
)
from generative_recommenders.research.modeling.sequential.losses.sampled_softmax import SampledSoftmaxLoss  # noqa
from generative_recommenders.research.modeling.sequential.output_postprocessors import (  # noqa
    L2NormEmbeddingPostprocessor,
)
from generative_recommenders.research.modeling.similarity_utils import get_similarity_function  # noqa

NUM_ITEMS = 40
L = 12  # train_fn.max_sequence_length


def make_sequences_csv(path: str) -> None:
    """sasrec_format.csv as DataProcessor.to_seq_data writes it (comma-joined lists, chronological)."""
    g = torch.Generator().manual_seed(123)
    rows = []

    def rnd_items(n):
        return [int(x) for x in torch.randint(1, NUM_ITEMS + 1, (n,), generator=g)]

    def rnd_times(n, start=978_300_000):
        gaps = []
        for _ in range(n - 1):
            kind = int(torch.randint(0, 4, (1,), generator=g))
            gaps.append([0, int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(60, 200_000, (1,), generator=g)),
                         int(torch.randint(200_000, 40_000_000, (1,), generator=g))][kind])
        t = [start]
        for x in gaps:
            t.append(t[-1] + x)
        return t

    lengths = [20, 13, 6, 2, 9, 12, 17, 3, 11, 14, 5, 25, 8, 13, 4, 16]
    for uid, n in enumerate(lengths, start=1):
        items = rnd_items(n)
        times = rnd_times(n)
        if uid == 5:  # a gap of 417901 s (float32 log puts it one bucket off the exact floor) to the target and inside
            times = [1_000_000_000 + 10 * i for i in range(n - 1)] + [1_000_000_000 + 10 * (n - 2) + 417901]
            times[4] = times[3] + 417901
            times = sorted(times)
        if uid == 6:  # every timestamp equal: all gaps 0
            times = [990_000_000] * n
        ratings = [int(x) for x in torch.randint(1, 6, (n,), generator=g)]
        rows.append({"index": uid - 1, "user_id": uid, "sequence_item_ids": ",".join(map(str, items)),
                     "sequence_ratings": ",".join(map(str, ratings)), "sequence_timestamps": ",".join(map(str, times))})
    pd.DataFrame(rows).to_csv(path, index=False, sep=",")


def build(tag: str, gin_text: str, gr_output_length: int, seed: int, port_file: str) -> None:
    gin.clear_config()
    gin.parse_config(gin_text)
    # --- train_fn's arguments (configs/ml-1m/hstu-sampled-softmax-n128-large-final.gin style) ---
    dataset_name = "ml-1m"
    max_sequence_length = L
    local_batch_size = 8
    eval_batch_size = 8
    main_module = "HSTU"
    dropout_rate = 0.2
    item_embedding_dim = 16
    interaction_module_type = "DotProduct"
    top_k_method = "MIPSBruteForceTopK"
    loss_module = "SampledSoftmaxLoss"
    num_negatives = 8
    temperature = 0.05
    item_l2_norm = True
    l2_norm_eps = 1e-6
    learning_rate = 1e-3
    weight_decay = 0
    num_warmup_steps = 0
    enable_tf32 = True
    world_size, rank = 1, 0
    positional_sampling_ratio = 1.0
    full_eval_every_n = 1

    random.seed(42)
    torch.manual_seed(seed)  # train.py seeds only `random`; seeded here so the file is reproducible
    csv = f"{OUT}/work/sasrec_format.csv"
    train_dataset = DatasetV2(ratings_file=csv, padding_length=max_sequence_length + 1, ignore_last_n=1,
                              chronological=True, sample_ratio=positional_sampling_ratio)
    eval_dataset = DatasetV2(ratings_file=csv, padding_length=max_sequence_length + 1, ignore_last_n=0,
                             chronological=True, sample_ratio=1.0)
    all_item_ids = list(range(1, NUM_ITEMS + 1))
    max_item_id = NUM_ITEMS

    # --- train.py lines 170-216 ---
    embedding_module = LocalEmbeddingModule(num_items=max_item_id, item_embedding_dim=item_embedding_dim)
    interaction_module, interaction_module_debug_str = get_similarity_function(
        module_type=interaction_module_type, query_embedding_dim=item_embedding_dim,
        item_embedding_dim=item_embedding_dim)
    output_postproc_module = L2NormEmbeddingPostprocessor(embedding_dim=item_embedding_dim, eps=1e-6)
    input_preproc_module = LearnablePositionalEmbeddingInputFeaturesPreprocessor(
        max_sequence_len=max_sequence_length + gr_output_length + 1, embedding_dim=item_embedding_dim,
        dropout_rate=dropout_rate)
    model = get_sequential_encoder(module_type=main_module, max_sequence_length=max_sequence_length,
                                   max_output_length=gr_output_length + 1, embedding_module=embedding_module,
                                   interaction_module=interaction_module, input_preproc_module=input_preproc_module,
                                   output_postproc_module=output_postproc_module, verbose=False)
    model_debug_str = model.debug_str()

    # Make every term observable (upstream's init leaves q.k and the biases ~1e-3): redraw item rows, uvqk and
    # the relative biases at N(0, 0.3). Training below then moves every parameter.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("_item_emb.weight") or name.endswith("_uvqk") or name.endswith("_pos_w") \
                    or name.endswith("_ts_w"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    # --- loss / sampling (lines 219-260) ---
    ar_loss = SampledSoftmaxLoss(num_to_sample=num_negatives, softmax_temperature=temperature, model=model,
                                 activation_checkpoint=False)
    loss_debug_str = f"ssl-t{temperature}-n{num_negatives}"
    negatives_sampler = LocalNegativesSampler(num_items=max_item_id, item_emb=model._embedding_module._item_emb,
                                              all_item_ids=all_item_ids, l2_norm=item_l2_norm,
                                              l2_norm_eps=l2_norm_eps)
    sampling_debug_str = negatives_sampler.debug_str()

    # --- DDP wrap + AdamW (lines 262-277); gloo on CPU instead of nccl ---
    dist.init_process_group("gloo", init_method=f"file://{port_file}", rank=rank, world_size=world_size)
    model = DDP(model, broadcast_buffers=False)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=weight_decay)

    date_str = date.today().strftime("%Y-%m-%d")
    model_subfolder = f"{dataset_name}-l{max_sequence_length}"
    model_desc = (
        f"{model_subfolder}"
        + f"/{model_debug_str}_{interaction_module_debug_str}_{sampling_debug_str}_{loss_debug_str}"
        + f"{f'-ddp{world_size}' if world_size > 1 else ''}-b{local_batch_size}-lr{learning_rate}-wu{num_warmup_steps}-wd{weight_decay}{'' if enable_tf32 else '-notf32'}-{date_str}"
    )
    if full_eval_every_n > 1:
        model_desc += f"-fe{full_eval_every_n}"

    # --- a few training steps: train.py lines 311-431 (minus logging/eval) ---
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=local_batch_size, shuffle=False)
    model.train()
    epoch = 0
    for epoch in range(2):
        for row in train_loader:
            seq_features, target_ids, target_ratings = movielens_seq_features_from_row(
                row, device="cpu", max_output_length=gr_output_length + 1)
            seq_features.past_ids.scatter_(dim=1, index=seq_features.past_lengths.view(-1, 1),
                                           src=target_ids.view(-1, 1))
            opt.zero_grad()
            input_embeddings = model.module.get_item_embeddings(seq_features.past_ids)
            seq_embeddings = model(past_lengths=seq_features.past_lengths, past_ids=seq_features.past_ids,
                                   past_embeddings=input_embeddings, past_payloads=seq_features.past_payloads)
            supervision_ids = seq_features.past_ids
            negatives_sampler._item_emb = model.module._embedding_module._item_emb
            ar_mask = supervision_ids[:, 1:] != 0
            loss, aux_losses = ar_loss(lengths=seq_features.past_lengths, output_embeddings=seq_embeddings[:, :-1, :],
                                       supervision_ids=supervision_ids[:, 1:],
                                       supervision_embeddings=input_embeddings[:, 1:, :],
                                       supervision_weights=ar_mask.float(), negatives_sampler=negatives_sampler,
                                       **seq_features.past_payloads)
            loss.backward()
            opt.step()
            print(f"[{tag}] epoch {epoch} loss {float(loss.detach()):.4f}")

    # --- save exactly as train.py line 528 ---
    ckpt_path = f"{OUT}/ckpts/{model_desc}_ep{epoch}"
    os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
    torch.save({"epoch": epoch, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()},
               ckpt_path)

    # --- reference outputs, as the research eval computes them (train.py 439-465, data/eval.py) ---
    model.eval()
    m = model.module
    eval_state = get_eval_state(
        model=m, all_item_ids=all_item_ids, negatives_sampler=negatives_sampler,
        top_k_module_fn=lambda item_embeddings, item_ids: get_top_k_module(
            top_k_method=top_k_method, model=m, item_embeddings=item_embeddings, item_ids=item_ids),
        device="cpu", float_dtype=None)
    eval_loader = torch.utils.data.DataLoader(eval_dataset, batch_size=eval_batch_size, shuffle=False)
    batches = []
    with torch.inference_mode():
        for row in eval_loader:
            seq_features, target_ids, target_ratings = movielens_seq_features_from_row(
                row, device="cpu", max_output_length=gr_output_length + 1)
            for with_ts in (True, False):
                payloads = dict(seq_features.past_payloads)
                if not with_ts:
                    payloads.pop("timestamps")
                past_embeddings = m.get_item_embeddings(seq_features.past_ids)
                # eval.py line 108: the user embedding at the last valid position (lengths - 1)
                user_emb = m.encode(past_lengths=seq_features.past_lengths, past_ids=seq_features.past_ids,
                                    past_embeddings=past_embeddings, past_payloads=payloads)
                seq_out = m(past_lengths=seq_features.past_lengths, past_ids=seq_features.past_ids,
                            past_embeddings=past_embeddings, past_payloads=payloads)  # [B, N, D], all positions
                # the eval's scorer: MIPSBruteForceTopK over all items with L2-normalised rows (k = every item)
                X = eval_state.candidate_index.ids.size(1)
                top_scores, top_ids = eval_state.top_k_module(query_embeddings=user_emb, k=X)
                scores = torch.full((user_emb.size(0), NUM_ITEMS + 1), float("nan"))
                scores.scatter_(1, top_ids, top_scores)  # column = item id; column 0 (padding) stays NaN
                metrics = eval_metrics_v2_from_tensors(
                    eval_state, m, seq_features._replace(past_payloads=payloads), target_ids=target_ids,
                    target_ratings=target_ratings, filter_invalid_ids=False)  # 40 items: filtering leaves < k
                batches.append({
                    "with_timestamps": with_ts,
                    "user_id": row["user_id"].clone(),
                    "past_lengths": seq_features.past_lengths.clone(),
                    "past_ids": seq_features.past_ids.clone(),
                    "timestamps": seq_features.past_payloads["timestamps"].clone() if with_ts else None,
                    "ratings": seq_features.past_payloads["ratings"].clone(),
                    "target_ids": target_ids.squeeze(1).clone(),
                    "target_timestamps": row["target_timestamps"].clone(),
                    "user_embedding": user_emb.clone(),
                    "seq_embeddings": seq_out.clone(),
                    "scores": scores,
                    "candidate_ids": torch.arange(NUM_ITEMS + 1),
                    "metrics": {k: v.clone() for k, v in metrics.items()},
                })
    hp = {"dataset_name": dataset_name, "max_sequence_length": max_sequence_length,
          "gr_output_length": gr_output_length, "item_embedding_dim": item_embedding_dim, "num_items": max_item_id,
          "gin": gin_text, "item_l2_norm": item_l2_norm, "l2_norm_eps": l2_norm_eps, "dropout_rate": dropout_rate,
          "model_desc": model_desc, "checkpoint": os.path.relpath(ckpt_path, OUT)}
    ref_path = f"{OUT}/{tag}_reference.pt"
    torch.save({"hparams": hp, "batches": batches,
                "upstream": "facebookresearch/generative-recommenders@2e81fab69a497fb5e24cd23569adf1e78070e4ec"},
               ref_path)
    dist.destroy_process_group()
    print(f"[{tag}] wrote {ckpt_path}\n[{tag}] wrote {ref_path}")


if __name__ == "__main__":
    os.makedirs(f"{OUT}/work", exist_ok=True)
    make_sequences_csv(f"{OUT}/work/sasrec_format.csv")
    torch.autograd.set_detect_anomaly(True)  # as train.py line 302
    for tag, gin_text, gr, seed in (
        ("hstu_b2_h2", "hstu_encoder.num_blocks = 2\nhstu_encoder.num_heads = 2\nhstu_encoder.dqk = 8\n"
                       "hstu_encoder.dv = 8\nhstu_encoder.linear_dropout_rate = 0.2\n", 3, 0),
        ("hstu_b2_h1", "hstu_encoder.num_blocks = 2\nhstu_encoder.num_heads = 1\nhstu_encoder.dqk = 16\n"
                       "hstu_encoder.dv = 16\nhstu_encoder.linear_dropout_rate = 0.2\n", 10, 1),
    ):
        pf = f"{OUT}/work/pg_{tag}"
        if os.path.exists(pf):
            os.remove(pf)
        build(tag, gin_text, gr, seed, pf)
