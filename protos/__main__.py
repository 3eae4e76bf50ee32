"""``python -m paramserve.protos``: (re)generate the Python code from the .proto files."""

from . import GENERATED_DIR, ensure_generated, is_current

if __name__ == "__main__":
    ensure_generated()
    print(f"generated code in {GENERATED_DIR} is current: {is_current()}")
