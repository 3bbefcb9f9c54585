"""Start one worker process: ``python -m worker --connect ADDR --model-name NAME --model-path PATH``.

The front end starts its local workers this way; start one by hand (``edgellm worker ...``
runs the same code) to add a worker on another machine. The options are those of
``WorkerSettings`` (worker/settings.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

from worker.settings import EXIT_CANNOT_START, WorkerSettings, parse_cores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgellm worker", description=__doc__.splitlines()[0])
    WorkerSettings.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    settings = WorkerSettings.from_args(parser.parse_args(argv))
    for problem in settings.problems():
        parser.error(problem)
    logging.basicConfig(level=logging.DEBUG if settings.verbose else logging.INFO,
                        format=f"%(asctime)s worker[{settings.name}:{os.getpid()}] %(levelname)s %(message)s")
    cores = parse_cores(settings.cores)
    if cores:
        os.sched_setaffinity(0, cores)
    if settings.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(settings.gpu)
    if settings.threads is None:
        settings = dataclasses.replace(settings, threads=len(cores) if cores else len(os.sched_getaffinity(0)))

    # Import llama.cpp only after pinning, so its thread pool and GPU choice follow the pins.
    from worker.engines import build_engine
    from worker.loop import CurveKeys, WorkerLoop
    from worker.model import ModelLoadError, quiet_llama_logs

    quiet_llama_logs(settings.verbose)
    try:
        engine = build_engine(settings.model_settings())
    except ModelLoadError as exc:
        logging.error("%s", exc)
        return EXIT_CANNOT_START
    curve = None
    if settings.curve_server_key_file or settings.curve_secret_key_file:
        import zmq.auth
        if not (settings.curve_server_key_file and settings.curve_secret_key_file):
            logging.error("CURVE needs both --curve-server-key-file and --curve-secret-key-file")
            return EXIT_CANNOT_START
        server_public, _ = zmq.auth.load_certificate(settings.curve_server_key_file)
        public, secret = zmq.auth.load_certificate(settings.curve_secret_key_file)
        if secret is None:
            logging.error("%s holds no secret key (use the .key_secret file)", settings.curve_secret_key_file)
            return EXIT_CANNOT_START
        curve = CurveKeys(server_public=server_public, public=public, secret=secret)
    loop = WorkerLoop(engine, settings.connect, settings.name, curve=curve, step_timeout=settings.step_timeout)
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    loop.run()
    return 1 if loop.failed else 0


if __name__ == "__main__":
    sys.exit(main())
