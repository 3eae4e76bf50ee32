# Shortcuts; the README's commands are the reference.
.PHONY: install protos test serve docker-test

install:
	pip install -e '.[test]'

protos:  ## recompile protos/*.proto into protos/generated/ (the build step of the install)
	pip install -e . --no-deps

test:
	python -m pytest

serve:
	paramserve serve

docker-test:  ## build the image with podman and exercise it
	bash tests/docker/run.sh
