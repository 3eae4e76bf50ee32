"""``python -m paramserve.protos``: recompile the .proto files in a checkout (an editable
install reads them from protos/generated/). Needs grpcio-tools in this environment;
``make protos`` (``pip install -e . --no-deps``) needs nothing extra, as the build brings its
own. An installed wheel carries its compiled contract and never needs this."""

from . import GENERATED_DIR, PROTO_DIR
from .compile import compile_protos

if __name__ == "__main__":
    for path in compile_protos(PROTO_DIR, GENERATED_DIR):
        print(f"wrote {path}")
