"""The classify job on LitServe, as its documentation shows it: one ``LitAPI`` with
dynamic batching (``max_batch_size``, ``batch_timeout``), one worker, the upload
read from the multipart form in ``decode_request``.

    python -m bench.peers.litserve_peer --port 8000      # POST /classify, GET /health
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np

from bench.peers.minimal import MAX_BATCH_SIZE, MAX_LATENCY_MS, Classifier, decode


class ClassifyAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.classifier = Classifier()

    def decode_request(self, request) -> np.ndarray:
        return decode(request["image"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, rows: np.ndarray) -> list[dict]:
        return self.classifier(rows)

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    api = ClassifyAPI(
        max_batch_size=MAX_BATCH_SIZE, batch_timeout=MAX_LATENCY_MS / 1000, api_path="/classify"
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    # LitServe writes a client.py into the working directory unless told not to.
    server.run(
        port=args.port,
        host="127.0.0.1",
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
