"""A proxyless gRPC client of the echo service, run as its own process.

gRPC reads its xDS bootstrap once per process, so every test client is a
process of its own, started with its bootstrap's path:

    python xds_client.py --bootstrap DIR/bootstrap.json --gen GEN_DIR \
        [--target xds:///echo] [--creds insecure|xds]

It opens one channel and keeps it for its whole life (so a test sees a
running client follow what the control plane pushes), then reads one JSON
command per line on stdin and answers each with one JSON line on stdout:

    {"calls": 300, "concurrency": 8, "metadata": {"x-canary": "true"},
     "method": "unary" | "stream", "timeout": 10}
 -> {"instances": {"echo-0": 101, ...}, "errors": {"UNAVAILABLE": 2},
     "error": "<code>: <details> of the first failure",
     "details": {"UNAVAILABLE": "<the first failure with that code>"}, "seconds": 0.8}

`--creds xds` is `grpc.xds_channel_credentials` over insecure fallback
credentials, as the README tells users to write it; `insecure` is a plain
channel. It exits when stdin closes.
"""

import argparse
import collections
import json
import os
import sys
import threading
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True, help="the gRPC xDS bootstrap file")
    p.add_argument("--gen", required=True, help="where the echo stubs were generated")
    p.add_argument("--target", default="xds:///echo")
    p.add_argument("--creds", choices=("insecure", "xds"), default="insecure")
    return p.parse_args()


def main():
    args = parse_args()
    # Read by gRPC when its first xDS channel is made; set before importing
    # it so nothing from the parent's environment can win.
    os.environ["GRPC_XDS_BOOTSTRAP"] = args.bootstrap
    os.environ.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
    sys.path.insert(0, args.gen)

    import grpc
    import grpc.experimental
    import echo_pb2
    import echo_pb2_grpc

    if args.creds == "xds":
        creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
        channel = grpc.secure_channel(args.target, creds)
    else:
        channel = grpc.insecure_channel(args.target)
    stub = echo_pb2_grpc.EchoStub(channel)

    def one_call(method, metadata, timeout):
        """The instance that answered."""
        if method == "stream":
            req = echo_pb2.StreamRequest(message="hi", count=2)
            replies = list(stub.ServerStream(req, metadata=metadata, timeout=timeout))
            return replies[-1].instance
        reply = stub.Unary(echo_pb2.EchoRequest(message="hi"), metadata=metadata, timeout=timeout)
        return reply.instance

    def batch(cmd):
        calls = int(cmd.get("calls", 1))
        concurrency = max(1, min(int(cmd.get("concurrency", 1)), calls))
        metadata = tuple((k, v) for k, v in cmd.get("metadata", {}).items())
        method = cmd.get("method", "unary")
        timeout = float(cmd.get("timeout", 10))
        instances = collections.Counter()
        errors = collections.Counter()
        first_error = {}
        lock = threading.Lock()
        left = [calls]

        def worker():
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                try:
                    who = one_call(method, metadata, timeout)
                except grpc.RpcError as e:
                    with lock:
                        errors[e.code().name] += 1
                        first_error.setdefault(e.code().name, f"{e.code().name}: {e.details()}")
                    continue
                with lock:
                    instances[who] += 1

        start = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {
            "instances": dict(instances),
            "errors": dict(errors),
            "error": next(iter(first_error.values()), None),
            "details": first_error,
            "seconds": round(time.monotonic() - start, 3),
        }

    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(batch(json.loads(line))), flush=True)
    channel.close()


if __name__ == "__main__":
    main()
