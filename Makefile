# Shortcuts; the README's commands are the reference.
.PHONY: install protos test serve docker-test

install:
	pip install -e '.[test]'

protos:  ## recompile protos/*.proto into protos/generated/ (pip install -e . does it too)
	python -m paramserve.protos

test:
	python -m pytest

serve:
	paramserve serve

docker-test:  ## build the image with podman and exercise it
	bash tests/docker/run.sh
