"""``python -m paramserve.protos``: recompile the .proto files in a checkout (an editable
install reads them from protos/generated/; needs grpcio-tools). ``pip install -e .`` does the
same; an installed wheel carries its compiled contract and never needs this."""

from . import GENERATED_DIR, PROTO_DIR
from .compile import compile_protos

if __name__ == "__main__":
    for path in compile_protos(PROTO_DIR, GENERATED_DIR):
        print(f"wrote {path}")
