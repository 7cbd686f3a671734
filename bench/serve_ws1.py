"""The service at world size 1 on one GPU, answering through the HTTP API (issue 21, deliverable 5).

One process, two services over the same stored corpus, each asked the same questions greedily
through `/v1/chat/completions`:

1. the one-process service (`KnowledgeBase(settings)`, the corpus's KV on the GPU);
2. the sharded service on a world of one over NCCL: `init_world("env://", backend="nccl")`,
   `LoopbackLink` (rank 0 its own shared rank: every layer's ATTEND exchange runs over the
   process group, then rank 0 attends the corpus as a shared rank attends its slice) and
   `KnowledgeBase(settings, link)`, the path `kb serve --shared-ranks 0` takes under torchrun.

Both answer through FastAPI and uvicorn (`create_app(ui=False)`: the web app's package is not on
the device). The model is a small random-weight Llama (the demo model's tokenizer and shape,
4 layers, bf16; the demo's weights do not travel to the device), so the answers are not
meaningful text; what is checked is that the two services give the same greedy tokens, that
`/healthz` says ok with the loopback link and that `/v1/cache` places the corpus on rank 0.

    python bench/serve_ws1.py --tokenizer DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the access code of the Velmora vault?",
    "Who keeps the keys of the north gate?",
]
DOC = (
    "The Velmora vault stands under the old mill. The access code of the Velmora vault is 7341. "
    "Only the quartermaster may open it, and only at dawn. The north gate is kept by Ilsa Marrow, "
    "who keeps its keys on a chain of brass. "
) * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(tokenizer: Path, folder: Path) -> Path:
    """A random-weight Llama with the demo model's tokenizer and config, cut to 4 layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((tokenizer / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))  # the demo's, as kb reads it
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def serve(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return url, server, thread


def ask(url: str) -> list[dict]:
    import httpx

    out = []
    for q in QUESTIONS:
        t0 = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "kb:vault",
                "messages": [{"role": "user", "content": q}],
                "max_tokens": 24,
                "temperature": 0,
            },
            timeout=600,
        )
        r.raise_for_status()
        body = r.json()
        out.append(
            {
                "question": q,
                "text": body["choices"][0]["message"]["content"],
                "usage": body["usage"],
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="the demo model's config and tokenizer")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    ap.add_argument("--device", default="cuda", help="cuda (NCCL), or cpu (gloo) for a smoke run")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")

    import httpx
    import torch

    work = Path(tempfile.mkdtemp(prefix="kb-ws1-"))
    folder = random_model(Path(args.tokenizer), work / "model")
    os.environ.update(
        KB_HOME=str(work / "home"), KB_MODEL=str(folder), KB_DEVICE=args.device, KB_AUTH="off"
    )
    if not cuda:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from kb.engine.distributed.loopback import LoopbackLink
    from kb.engine.distributed.protocol import init_world
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    settings = Settings()
    doc = work / "vault.txt"
    doc.write_text(DOC)
    kb = KnowledgeBase(settings)
    kb.create_corpus("vault")
    t0 = time.perf_counter()
    (ingested,) = kb.ingest("vault", [doc])
    ingest_s = time.perf_counter() - t0
    assert ingested.status == "ready", ingested
    url, server, thread = serve(create_app(kb, warm=False, ui=False))
    one = ask(url)
    server.should_exit = True
    thread.join(timeout=30)
    kb.close()

    os.environ.update(
        RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    world = init_world("env://", backend="nccl" if cuda else "gloo", timeout_s=120)
    link = LoopbackLink(world, rank_budget_bytes=int(settings.gpu_cache_gb * 2**30))
    link.stats.timing = True
    kb = KnowledgeBase(settings, link)
    url, server, thread = serve(create_app(kb, warm=False, ui=False))
    sharded = ask(url)
    health = httpx.get(f"{url}/healthz", timeout=30).json()
    cache = httpx.get(f"{url}/v1/cache", params={"name": "vault"}, timeout=30).json()
    server.should_exit = True
    thread.join(timeout=30)
    stats = link.stats.snapshot()
    kb.close()

    same = [a["text"] == b["text"] and a["usage"] == b["usage"] for a, b in zip(one, sharded)]
    result = {
        "what": "kb service at world size 1 over NCCL on one GPU (LoopbackLink), answering "
        "through the HTTP API, against the one-process service on the same GPU; random-weight "
        "4-layer Llama with the demo model's tokenizer and shape, bf16; greedy, 24 tokens",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "nccl": str(torch.cuda.nccl.version()) if cuda else None,
        "backend": world.backend,
        "corpus_tokens": cache[0]["tokens"] if cache else None,
        "ingest_s": round(ingest_s, 2),
        "one_process": one,
        "world_size_1": sharded,
        "same_greedy_answers": same,
        "healthz": health,
        "cache_shards": cache[0].get("shards") if cache else None,
        "exchanges": stats,
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_ws1.json").write_text(text + "\n")
    ok = all(same) and health.get("status") == "ok"
    print("OK" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
