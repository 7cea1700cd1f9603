"""The hf op: a Hugging Face Llama-style model built from a config (random weights, no download) with
``attn_implementation="fastgpt"`` against ``"sdpa"`` and ``"eager"`` — prefill, forward+backward and
greedy ``generate``, batch 1 and a left-padded batch — timed interleaved in the same run.

A padded batch runs on fastgpt too: its prefill and training step on ``varlen_attention`` (the
prompts packed, no padding row computed), its decode steps once per sequence on its own keys. Each
fastgpt record counts, over one untimed call, how many attention-layer calls ran on fastgpt, how many
fell back to transformers' SDPA and how many ``varlen_attention`` calls ran (``attention_calls``).
"""

import copy
import time
import warnings

import torch

from fastgpt.bench.records import first_line
from fastgpt.bench.settings import DTYPE_NAMES, default_dtypes
from fastgpt.bench.timing import TIMING_BLOCKS, block_reps, summarize, timed_calls

# attn_implementation -> kind: fastgpt's against the two a transformers user would otherwise pick
IMPLEMENTATIONS = {"fastgpt": "fastgpt", "sdpa": "baseline", "eager": "baseline"}
PASSES = ("prefill", "fwd+bwd", "generate")
PAD = 0  # token id of the padding; prompts draw from 1..vocab-1

# 4 layers, d_model 512, 8 query / 2 KV heads of 64 (GQA), Llama's MLP width rule (2/3 of 4·d_model,
# rounded up to a multiple of 256) and vocabulary size
LLAMA = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
)
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)


def hf_sizes(device, sizes):
    """(LlamaConfig keyword arguments, prompt tokens, new tokens of generate, batch sizes). The
    padded batch (size > 1) is left-padded. CPU sizes are smaller than the GPU's 2k-token prompt and
    128 new tokens so that a run takes minutes on a few cores."""
    if sizes == "tiny":
        return TINY, 16, 4, (1, 4)
    prompt, new_tokens = {
        ("cpu", "quick"): (256, 16),
        ("cpu", "full"): (1024, 64),
        ("cuda", "quick"): (2048, 32),
        ("cuda", "full"): (2048, 128),
    }[device, sizes]
    return LLAMA, prompt, new_tokens, (1, 4)


def prompt_lengths(batch, prompt):
    """Tokens of each prompt: all ``prompt`` long at batch 1; a padded batch of 4 holds prompt,
    7/8, 3/4 and 1/2 of it (a batch of another size cycles through the same fractions)."""
    if batch == 1:
        return [prompt]
    eighths = (8, 7, 6, 4)
    return [max(1, prompt * eighths[i % 4] // 8) for i in range(batch)]


def make_batch(vocab, lengths, prompt, device):
    """(input_ids, attention_mask, labels) of left-padded prompts of ``lengths`` (labels -100 on padding)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1, vocab, (len(lengths), prompt), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, : prompt - length] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def make_models(config_kwargs, max_positions, device, dtype):
    """{attn_implementation: model}, all with the same random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**config_kwargs, max_position_embeddings=max_positions, pad_token_id=PAD)
    models = {}
    for name in IMPLEMENTATIONS:
        torch.manual_seed(0)
        # each model its own config: from_config writes the attention implementation into it
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
        models[name] = model.to(device, dtype)
    reference = models["fastgpt"].state_dict()
    for model in models.values():
        model.load_state_dict(reference)
    return models


def make_step(model, pass_, batch, new_tokens):
    """``step(i)``: one ``pass_`` of ``model`` on ``batch`` = (input_ids, attention_mask, labels);
    returns the generated tokens for ``generate``."""
    ids, mask, labels = batch
    if pass_ == "prefill":  # as generate's prefill: the KV cache filled, logits of the last position only

        def step(i):
            model.eval()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    elif pass_ == "fwd+bwd":  # the loss over every position and its gradients (no optimizer update)

        def step(i):
            model.train()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)

    else:  # greedy, exactly new_tokens (min_new_tokens: random weights may hit the EOS id early)

        def step(i):
            model.eval()
            return model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=PAD,
            )

    return step


class AttentionCallCounter:
    """While active, counts the attention-layer calls of ``attn_implementation="fastgpt"``: those
    that ran on fastgpt (``fastgpt``), those it handed to transformers' SDPA (``sdpa_fallback``), and
    the ``fastgpt.ops.varlen_attention`` calls among the first (``varlen``: a padded batch's
    prefill and training step; its decode steps run ``ops.attention`` once per sequence)."""

    def __init__(self):
        self.counts = {"fastgpt": 0, "sdpa_fallback": 0, "varlen": 0}

    def _counting(self, key, fn):
        def counted(*args, **kwargs):
            self.counts[key] += 1
            return fn(*args, **kwargs)

        return counted

    def __enter__(self):
        from transformers import AttentionInterface

        from fastgpt import ops
        from fastgpt.integrations import huggingface

        layers = AttentionInterface._global_mapping  # where models look "fastgpt" up on every call
        self._saved = layers[huggingface.NAME], ops.varlen_attention, huggingface._sdpa_attention_forward
        layers[huggingface.NAME] = self._counting("layers", layers[huggingface.NAME])
        ops.varlen_attention = self._counting("varlen", ops.varlen_attention)
        huggingface._sdpa_attention_forward = self._counting("sdpa_fallback", huggingface._sdpa_attention_forward)
        self.counts["layers"] = 0
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        from fastgpt import ops
        from fastgpt.integrations import huggingface

        layers = AttentionInterface._global_mapping
        layers[huggingface.NAME], ops.varlen_attention, huggingface._sdpa_attention_forward = self._saved
        self.counts["fastgpt"] = self.counts.pop("layers") - self.counts["sdpa_fallback"]
        return False


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _warm_up(step, settings, count_calls):
    """Untimed calls (one on the CPU, where a call takes seconds and there is nothing to compile);
    returns (repetitions that fit the budget, attention-call counts or None, the last call's output)."""
    counter = AttentionCallCounter() if count_calls else None
    output = None
    for call in range(1 if settings.device == "cpu" else max(1, settings.warmup)):
        _synchronize(settings.device)
        t0 = time.perf_counter()
        if counter is not None and call == 0:
            with counter:
                output = step(0)
        else:
            output = step(0)
        _synchronize(settings.device)
        one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(settings.max_reps, max(settings.min_reps, settings.budget_s / one)))
    return reps, (counter.counts if counter else None), output


def transformers_version():
    import transformers

    return transformers.__version__


def _fallback_note(counts):
    total = counts["fastgpt"] + counts["sdpa_fallback"]
    varlen = f" ({counts['varlen']} varlen_attention calls)" if counts.get("varlen") else ""
    if counts["sdpa_fallback"] == 0:
        return f"all {total} attention calls ran on fastgpt{varlen}"
    return (
        f"{counts['fastgpt']} of {total} attention calls ran on fastgpt, {counts['sdpa_fallback']} went to "
        "transformers' SDPA (a mask fastgpt does not read, dropout, or an option it lacks)"
    )


def _skip_records(settings, reason):
    dtypes = ",".join(DTYPE_NAMES[d] for d in settings.dtypes or default_dtypes("hf", settings.device))
    return [
        {
            "op": "hf", "pass": "all", "shape": {}, "dtype": dtypes, "device": settings.device,
            "implementation": name, "kind": kind, "status": "skipped", "reason": reason,
        }
        for name, kind in IMPLEMENTATIONS.items()
    ]


def _unavailable_reason():
    """Why the op cannot run here (None: it can)."""
    from fastgpt.integrations import huggingface

    try:
        huggingface.register()  # idempotent; says what is missing when transformers is absent or too old
    except ImportError as exc:
        return f"{first_line(exc)} (pip install 'fastgpt[hf]')"
    return None


def run(settings, emit):
    """Time prefill, forward+backward and generate of the Llama-style model for each attention
    implementation, their repetitions interleaved in TIMING_BLOCKS blocks; ``emit(record)`` each."""
    reason = _unavailable_reason()
    if reason:
        for rec in _skip_records(settings, reason):
            emit(rec)
        return
    config_kwargs, prompt, new_tokens, batch_sizes = hf_sizes(settings.device, settings.sizes)
    for dtype in settings.dtypes or default_dtypes("hf", settings.device):
        models = make_models(config_kwargs, prompt + new_tokens, settings.device, dtype)
        for batch_size in batch_sizes:
            lengths = prompt_lengths(batch_size, prompt)
            batch = make_batch(config_kwargs["vocab_size"], lengths, prompt, settings.device)
            for pass_ in PASSES:
                shape = {
                    "model": "llama", "n_layers": config_kwargs["num_hidden_layers"],
                    "hidden": config_kwargs["hidden_size"], "heads": config_kwargs["num_attention_heads"],
                    "kv_heads": config_kwargs["num_key_value_heads"], "head_dim": config_kwargs["head_dim"],
                    "vocab": config_kwargs["vocab_size"], "batch": batch_size, "prompt": prompt,
                    "padding": "left" if len(set(lengths)) > 1 else "none",
                }
                if pass_ == "generate":
                    shape["new_tokens"] = new_tokens
                tokens = batch_size * new_tokens if pass_ == "generate" else sum(lengths)
                for rec in _time_case(models, pass_, batch, new_tokens, shape, tokens, dtype, settings):
                    emit(rec)
        del models
        if settings.device == "cuda":
            torch.cuda.empty_cache()


def _time_case(models, pass_, batch, new_tokens, shape, tokens, dtype, settings):
    """The records of every implementation on one case, timed in interleaved blocks."""
    records, timed, outputs = {}, {}, {}
    for name, kind in IMPLEMENTATIONS.items():
        records[name] = {
            "op": "hf", "pass": pass_, "shape": shape, "dtype": DTYPE_NAMES[dtype], "device": settings.device,
            "implementation": name, "kind": kind, "status": "ok", "reason": None, "tokens": tokens,
            "attn_implementation": name, "transformers": transformers_version(),
        }
        step = make_step(models[name], pass_, batch, new_tokens)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # generation-config chatter, identical for every implementation
                reps, counts, outputs[name] = _warm_up(step, settings, count_calls=name == "fastgpt")
            timed[name] = (step, reps, [])
            if counts is not None:
                records[name]["attention_calls"] = counts
                records[name]["note"] = _fallback_note(counts)
        except Exception as exc:  # an out-of-memory must not end the run; fastgpt failing is an error
            status = "error" if kind == "fastgpt" else "skipped"
            records[name].update(status=status, reason=f"{type(exc).__name__}: {first_line(exc)}")
    for block in range(TIMING_BLOCKS):
        for name, (step, reps, times) in list(timed.items()):
            count = block_reps(reps, block)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    times += timed_calls(step, len(times), count, 1, settings)
            except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
                status = "error" if IMPLEMENTATIONS[name] == "fastgpt" else "skipped"
                records[name].update(status=status, reason=f"{type(exc).__name__}: {first_line(exc)}")
                del timed[name]
    for name, (_, _, times) in timed.items():
        timing = summarize(times)
        records[name].update(timing.__dict__)
        records[name]["tokens_per_s"] = tokens / (timing.median_ms / 1e3)
    if pass_ == "generate" and outputs.get("sdpa") is not None:
        for name in ("fastgpt", "eager"):
            if outputs.get(name) is not None:
                records[name]["same_tokens_as_sdpa"] = bool(torch.equal(outputs[name], outputs["sdpa"]))
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    return list(records.values())


def markdown_table(results):
    """The hf records of ``results`` as a markdown table: each case's median times, fastgpt's ratios
    (other's time / fastgpt's: above 1 means fastgpt is faster), where its attention ran and, for
    generate, whether it produced the tokens "sdpa" did."""
    recs = [r for r in results["measurements"] if r["op"] == "hf"]
    skipped = [r for r in recs if r["status"] != "ok"]
    ours = [r for r in recs if r["status"] == "ok" and r["implementation"] == "fastgpt"]
    if not ours:
        return "\n".join(f"hf {r['implementation']}: {r['status']}: {r['reason']}" for r in skipped)
    lines = [
        "| pass | batch | prompt | dtype | fastgpt ms | sdpa ms | eager ms | vs sdpa | vs eager "
        "| attention calls on fastgpt | generated tokens = sdpa's |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in ours:
        same = [o for o in recs if o["status"] == "ok" and _same_case(o, r)]
        ms = {o["implementation"]: f"{o['median_ms']:.1f}" for o in same}
        ratio = {k: f"{v:.2f}×" for k, v in r.get("speedup", {}).items()}
        s = r["shape"]
        batch = f"{s['batch']}" + (" (left-padded)" if s["padding"] == "left" else "")
        prompt = f"{s['prompt']}" + (f" + {s['new_tokens']} new" if "new_tokens" in s else "")
        calls = r.get("attention_calls", {})
        where = f"{calls.get('fastgpt', 0)} of {calls.get('fastgpt', 0) + calls.get('sdpa_fallback', 0)}" + (
            f" ({calls['varlen']} varlen)" if calls.get("varlen") else ""
        )
        same = {True: "yes", False: "**no**"}.get(r.get("same_tokens_as_sdpa"), "–")
        lines.append(
            f"| {r['pass']} | {batch} | {prompt} | {r['dtype']} | {ms['fastgpt']} | {ms.get('sdpa', '–')} "
            f"| {ms.get('eager', '–')} | {ratio.get('sdpa', '–')} | {ratio.get('eager', '–')} "
            f"| {where} | {same} |"
        )
    lines += [f"- {r['implementation']} {r['pass']}: {r['status']}: {r['reason']}" for r in skipped]
    return "\n".join(lines)


def _same_case(a, b):
    return (a["pass"], a["shape"], a["dtype"], a["device"]) == (b["pass"], b["shape"], b["dtype"], b["device"])
