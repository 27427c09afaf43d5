# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# torch==2.13.0 is a local CPU build; an unpinned torch would pull a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,test,demo,bench,serve,ray,pipeline,grpc,optimize]' $(TORCH)
	rm -f .venv/.installed-*; touch $@

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf .venv build dist src/*.egg-info
