#!/usr/bin/env python
"""Answer ranking speed of `AlbefForQuestionAnswering.rank_answers`: before and after, in the same run.

"Before" is the ranking as it was computed until this benchmark was written (and as the original computes it):
every kept answer decoded in full, padding included, with its own copy of the question states, and a
log-softmax over the whole vocabulary at every position (`model(..., labels=...)`'s per-answer loss). "After"
is `rank_answers` now: the [CLS] step shared by the candidates, the question states' keys/values projected
once per question, the vocabulary scored only where an answer token is predicted. Both rank the same
questions from the same question states; the script checks that the rankings are identical and prints the
largest score difference.

The model is the one of issue 15: the text side of all-MiniLM-L6-v2 (BERT 384 x 6 layers, 12 heads,
vocabulary 30,522) split 3 text + 3 fusion layers, a 3-layer answer decoder, random weights (speed does not
depend on them); the questions and the 32-answer list are the synthetic world's. Timings alternate before /
after and report the median per question, in wall time and in process CPU time (all threads; on a busy
machine it suffers less from the other processes); the ratio is the figure to compare across machines.

    python benchmarks/bench_vqa.py                     # fp32, 2 threads, eager attention, 64 questions a batch
    python benchmarks/bench_vqa.py --attn sdpa --threads 1

Before is timed at 64 questions a batch (the algorithm alone) and at 8 (transformers' evaluation batch, the
default until `AlbefTrainingArguments` set 64).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertTokenizer

from albef_hf import AlbefConfig, AlbefForQuestionAnswering, AlbefImageProcessor, AlbefProcessor
from albef_hf.data.synthetic import VQA_ANSWER_LIST, SyntheticDataset
from albef_hf.data.synthetic.config import SyntheticWorldConfig
from albef_hf.demo.data import synthetic_vocabulary
from albef_hf.modeling_albef_downstream import answer_decoder_config


def issue_model(vocab_size: int, attn: str) -> AlbefForQuestionAnswering:
    config = AlbefConfig(
        vision_config={
            "hidden_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "intermediate_size": 768,
            "image_size": 64,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "fusion_layer": 3,
        },
        embed_dim=128,
    )
    config.decoder_config = answer_decoder_config(config.text_config, num_layers=3)
    torch.manual_seed(0)
    return AlbefForQuestionAnswering._from_config(config, attn_implementation=attn).eval()


def padded_tokenizer(vocab_size: int) -> BertTokenizer:
    """The synthetic world's words, then filler tokens up to `vocab_size` (the cost depends on the size only)."""
    words = synthetic_vocabulary(SyntheticWorldConfig())
    filler = [f"[unused{i}]" for i in range(vocab_size - len(words))]
    return BertTokenizer(vocab={token: index for index, token in enumerate(words + filler)})


@torch.no_grad()
def rank_before(model, answer_ids, answer_mask, question_states, question_mask, k):
    """`(answer_ids, scores)` of the ranking as computed before: each kept answer decoded in full."""
    num_questions = question_states.shape[0]
    k = min(k, answer_ids.shape[0])
    start = answer_ids[:1, :1].expand(num_questions, 1)
    first_logits = model.decode(start, question_states, question_mask)[0][:, 0]
    top_probs, top_ids = first_logits.softmax(-1).index_select(1, answer_ids[:, 1]).topk(k, dim=1)
    rows = top_ids.reshape(-1)
    candidates = answer_ids[rows]
    output = model(
        question_states=question_states,
        question_attention_mask=question_mask,
        answer_input_ids=candidates,
        answer_attention_mask=answer_mask[rows],
        labels=candidates.masked_fill(candidates == model.config.decoder_config.pad_token_id, -100),
        answers_per_question=torch.full((num_questions,), k),
    )
    scores = top_probs.log() - output.answer_loss.view(num_questions, k)
    order = scores.softmax(-1).topk(k, dim=1).indices
    return top_ids.gather(1, order), scores.gather(1, order)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=64, help="questions per rank_answers call")
    parser.add_argument(
        "--old-batch-size", type=int, default=8, help="the evaluation batch before (transformers' default)"
    )
    parser.add_argument("--questions", type=int, default=128, help="questions timed per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the variants alternate)")
    parser.add_argument("--k", type=int, default=128, help="first-token shortlist (at most the 32 answers)")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--attn", default="eager", choices=("eager", "sdpa"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = issue_model(args.vocab_size, args.attn)
    processor = AlbefProcessor(AlbefImageProcessor(size=64), padded_tokenizer(args.vocab_size))
    answers = processor.tokenize_answers(list(VQA_ANSWER_LIST))
    questions = SyntheticDataset("vqa", "test", args.questions, seed=0, image_size=64)
    rows = [questions[i] for i in range(args.questions)]
    inputs = processor(
        images=[row["image"] for row in rows],
        text=[row["question"] for row in rows],
        text_normalization="question",
    )
    with torch.no_grad():
        all_states, all_masks = model.encode_question(**inputs)[:2]

    def batches(size: int):
        return zip(all_states.split(size), all_masks.split(size), strict=True)

    def before(question_states, question_mask):
        return rank_before(
            model, answers["input_ids"], answers["attention_mask"], question_states, question_mask, args.k
        )

    def after(question_states, question_mask):
        ranking = model.rank_answers(
            answers["input_ids"],
            answers["attention_mask"],
            question_states=question_states,
            question_attention_mask=question_mask,
            k=args.k,
        )
        return ranking.answer_ids, ranking.scores

    worst = 0.0
    for question_states, question_mask in batches(args.batch_size):
        ids_before, scores_before = before(question_states, question_mask)
        ids_after, scores_after = after(question_states, question_mask)
        if not torch.equal(ids_before, ids_after):
            raise SystemExit("the rankings differ")
        worst = max(worst, float((scores_before - scores_after).abs().max()))

    variants = {
        f"before, batch {args.old_batch_size}": (before, args.old_batch_size),
        f"before, batch {args.batch_size}": (before, args.batch_size),
        f"after, batch {args.batch_size}": (after, args.batch_size),
    }
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (function, size) in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for question_states, question_mask in batches(size):
                function(question_states, question_mask)
            wall[name].append((time.perf_counter() - start) / args.questions)
            cpu[name].append((time.process_time() - start_cpu) / args.questions)
    print(
        f"rank_answers, {len(VQA_ANSWER_LIST)} answers, k={args.k}, vocabulary {args.vocab_size}, {args.attn} "
        f"attention, fp32, {args.threads} threads (medians of {args.repeats} alternating rounds of "
        f"{args.questions} questions)"
    )
    for name in variants:
        seconds = statistics.median(wall[name])
        print(
            f"{name + ':':18}{1 / seconds:6.1f} questions / s, {1000 * seconds:6.1f} ms / question "
            f"(CPU time {1000 * statistics.median(cpu[name]):.1f} ms)"
        )
    new = list(variants)[-1]
    for old in list(variants)[:-1]:
        speed_up = statistics.median(wall[old]) / statistics.median(wall[new])
        cpu_speed_up = statistics.median(cpu[old]) / statistics.median(cpu[new])
        print(f"speed-up over '{old}': {speed_up:.2f}x wall, {cpu_speed_up:.2f}x CPU time")
    print(f"identical rankings, largest score difference {worst:.1e}")


if __name__ == "__main__":
    main()
