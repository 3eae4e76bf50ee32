"""Talks to a paramserve server with tritonclient.grpc, as a Triton user would.

In the test's own process (paramserve's messages live in a descriptor pool of their own, so
tritonclient's ``inference`` messages load beside them), or standalone:
  python tests/triton_probe.py JOB.json REPORT.json
JOB: {"url": "127.0.0.1:PORT", "calls": [{"model": ..., "version": ..., "input": X.npy,
      "output": Y.npy}]}
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(job_path: str, report_path: str) -> None:
    job = json.load(open(job_path))
    json.dump(probe(job["url"], job["calls"]), open(report_path, "w"))


def probe(url: str, calls: list[dict]) -> dict:
    """Liveness, server metadata, and per call: metadata, config, infer, statistics."""
    client = grpcclient.InferenceServerClient(url=url)
    report = {"live": client.is_server_live(), "ready": client.is_server_ready(),
              "server": client.get_server_metadata(as_json=True), "calls": []}
    for call in calls:
        entry = {"model": call["model"]}
        try:
            meta = client.get_model_metadata(call["model"], call.get("version", ""), as_json=True)
            config = client.get_model_config(call["model"], call.get("version", ""),
                                             as_json=True)
            x = np.load(call["input"])
            spec = meta["inputs"][0]
            infer_input = grpcclient.InferInput(spec["name"], list(x.shape), spec["datatype"])
            infer_input.set_data_from_numpy(x)
            result = client.infer(call["model"], [infer_input],
                                  model_version=call.get("version", ""))
            np.save(call["output"], result.as_numpy(meta["outputs"][0]["name"]))
            stats = client.get_inference_statistics(call["model"], as_json=True)
            entry.update(metadata=meta, config=config, statistics=stats,
                         response=result.get_response(as_json=True),
                         ready=client.is_model_ready(call["model"]))
        except InferenceServerException as err:
            entry["error"] = {"status": err.status(), "message": err.message()}
        report["calls"].append(entry)
    client.close()
    return report


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
