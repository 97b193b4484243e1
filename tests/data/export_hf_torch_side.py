"""The PyTorch side of tests/test_export_hf.py, run in a fresh process: ``python THIS spec.json out.json``.

Only transformers, lm-eval and the export directories: this project cannot be imported here, and
the test points every Hugging Face cache at its own empty directories.
"""
import json
import sys

sys.modules["parscale_jax"] = None  # an export must not need the project that wrote it

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

torch.set_num_threads(1)
spec = json.load(open(sys.argv[1]))
out = {}


def generate(export):
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    enc = tok(spec["prompts"], return_tensors="pt", padding=True, padding_side="left")
    S = enc["input_ids"].shape[1]
    kw = dict(max_new_tokens=spec["n_new"], do_sample=False)
    ids = model.generate(**enc, **kw)[:, S:].tolist()
    no_cache = model.generate(**enc, use_cache=False, **kw)[:, S:].tolist()
    prompts = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    # Beam search reorders and expands the cache: the P streams of a beam must move together.
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    beam_equal = model.generate(**enc, **beams).tolist() == model.generate(**enc, use_cache=False, **beams).tolist()
    name = type(model).__module__.rsplit(".", 1)[-1] if "transformers_modules" in type(model).__module__ \
        else type(model).__module__
    return {"class": f"{name}.{type(model).__name__}", "new_ids": ids, "no_cache_ids": no_cache,
            "prompt_ids": prompts, "beam_cache_equals_recompute": beam_equal}


out["generate"] = {P: generate(d) for P, d in spec["exports"].items()}

# The tokenizer, without trust_remote_code (stdin is closed: transformers' question about the
# config's remote code gets no answer, and the tokenizer loads all the same).
tok = AutoTokenizer.from_pretrained(spec["exports"]["2"])
tok1 = AutoTokenizer.from_pretrained(spec["exports"]["1"])
enc = [tok.encode(t, add_special_tokens=False) for t in spec["texts"]]
out["tokenizer"] = {
    "special": {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id, "len": len(tok),
                "bos_257": tok.convert_ids_to_tokens(257)},
    "encode": enc, "p1_encode": [tok1.encode(t, add_special_tokens=False) for t in spec["texts"]],
    "round_trip": [tok.decode(ids, skip_special_tokens=True) for ids in enc],
    "decode": [tok.decode(ids, skip_special_tokens=True) for ids in spec["decode_ids"]],
}
word = AutoTokenizer.from_pretrained(spec["word_export"], trust_remote_code=True)
out["word"] = {"eos": word.eos_token_id, "pad": word.pad_token_id,
               "ids": word.encode("w1 w2 w299 <|endoftext|> w3", add_special_tokens=False)}

# lm-eval's hf backend on the parity export.
import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

lm = HFLM(pretrained=spec["parity_export"], trust_remote_code=True, dtype="float32", device="cpu",
          batch_size=spec["batch_size"], max_length=spec["max_length"])


def instances(kind, args):
    return [Instance(kind, {}, tuple(a), i) for i, a in enumerate(args)]


out["loglikelihood"] = lm.loglikelihood(instances("loglikelihood", spec["requests"]), disable_tqdm=True)
out["rolling"] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in spec["documents"]]),
                                          disable_tqdm=True)
out["generate_until"] = lm.generate_until(instances("generate_until", spec["gen_requests"]), disable_tqdm=True)
res = lm_eval.simple_evaluate(model=lm, tasks=[spec["task"]], bootstrap_iters=0, log_samples=True,
                              task_manager=TaskManager(include_path=spec["task_dir"], include_defaults=False))
samples = sorted(res["samples"][spec["task"]], key=lambda s: s["doc_id"])
out["task"] = {"metrics": {k: res["results"][spec["task"]][k] for k in ("acc,none", "acc_norm,none")},
               "lls": [[r[0] for r in s["filtered_resps"]] for s in samples]}
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
