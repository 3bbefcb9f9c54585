"""Start one worker process: ``python -m worker --connect ADDR --model-name NAME --model-path PATH``.

The front end starts its local workers this way; start one by hand (``edgellm worker ...``
runs the same code) to add a worker on another machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def parse_cores(text: str | None) -> list[int] | None:
    """'0,2-3' -> [0, 2, 3]."""
    if not text:
        return None
    cores: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    return cores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgellm worker", description=__doc__.splitlines()[0])
    p.add_argument("--connect", required=True, help="the front end's worker address, e.g. tcp://10.0.0.2:5555")
    p.add_argument("--model-name", required=True)
    p.add_argument("--model-path", required=True)
    p.add_argument("--kind", choices=["chat", "embedding"], default="chat")
    p.add_argument("--ctx-size", type=int, default=2048, help="context window of one request, in tokens")
    p.add_argument("--batch-size", type=int, default=512, help="most tokens in one llama_decode")
    p.add_argument("--parallel", type=int, default=1, help="requests decoded together (slots)")
    p.add_argument("--threads", type=int, default=None, help="default: the number of --cores, else all cores")
    p.add_argument("--cores", default=None, help="CPU cores to pin to, e.g. 0-1 or 2,3")
    p.add_argument("--gpu", default=None, help="GPU index to pin to (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--chat-template", default=None, help="a Jinja template overriding the model's")
    p.add_argument("--curve-server-key-file", default=None,
                   help="the server's public key file (server.key from 'edgellm keys server')")
    p.add_argument("--curve-secret-key-file", default=None,
                   help="this worker's key pair file (NAME.key_secret from 'edgellm keys NAME')")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s worker[{args.model_name}:{os.getpid()}] %(levelname)s %(message)s")
    cores = parse_cores(args.cores)
    if cores:
        os.sched_setaffinity(0, cores)
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    threads = args.threads or (len(cores) if cores else len(os.sched_getaffinity(0)))

    # Import llama.cpp only after pinning, so its thread pool and GPU choice follow the pins.
    from worker.engines import build_engine
    from worker.loop import CurveKeys, WorkerLoop
    from worker.model import ModelLoadError, quiet_llama_logs

    quiet_llama_logs(args.verbose)
    try:
        engine = build_engine(args.kind, args.model_path, ctx_size=args.ctx_size, slots=args.parallel,
                              threads=threads, n_gpu_layers=args.n_gpu_layers, n_batch=args.batch_size,
                              chat_template=args.chat_template)
    except ModelLoadError as exc:
        logging.error("%s", exc)
        return 2
    curve = None
    if args.curve_server_key_file or args.curve_secret_key_file:
        import zmq.auth
        if not (args.curve_server_key_file and args.curve_secret_key_file):
            logging.error("CURVE needs both --curve-server-key-file and --curve-secret-key-file")
            return 2
        server_public, _ = zmq.auth.load_certificate(args.curve_server_key_file)
        public, secret = zmq.auth.load_certificate(args.curve_secret_key_file)
        if secret is None:
            logging.error("%s holds no secret key (use the .key_secret file)", args.curve_secret_key_file)
            return 2
        curve = CurveKeys(server_public=server_public, public=public, secret=secret)
    loop = WorkerLoop(engine, args.connect, args.model_name, curve=curve)
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
