# The livesend GitHub container action (action.yml: runs.image). The runner builds it in each job,
# so it stays small and quick: a slim Python, git, and livesend from this repository's own source,
# with its runtime requirements pinned by hash. Nothing is downloaded when the action runs except
# what the `install` input asks for.
FROM python:3.12-slim-bookworm

# git: livesend, DVC and DVCLive read the commit and the remote of the checkout.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# For the user's `install` and `run` (in the image's own Python): unbuffered output, so the training
# log reaches the step log live; pip quiet about running as root, which container actions must.
ENV PYTHONUNBUFFERED=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# livesend in a virtual environment of its own: the user's `install` can neither break it nor be
# held back by its pins, and the training's `python` does not see it.
COPY requirements/action.txt /opt/livesend-src/requirements/action.txt
COPY pyproject.toml README.md /opt/livesend-src/
COPY livesend /opt/livesend-src/livesend
RUN python -m venv /opt/livesend \
    && /opt/livesend/bin/pip install --no-cache-dir --require-hashes -r /opt/livesend-src/requirements/action.txt \
    && /opt/livesend/bin/pip install --no-cache-dir --no-deps --no-build-isolation /opt/livesend-src \
    && /opt/livesend/bin/pip uninstall -y -q setuptools pip \
    && rm -rf /opt/livesend-src

COPY entrypoint.py /opt/livesend-action/entrypoint.py
# The post step (action.yml: runs.post-entrypoint) is the same file in its `post` role.
RUN printf '#!/bin/sh\nexec /opt/livesend/bin/python /opt/livesend-action/entrypoint.py post\n' \
        > /opt/livesend-action/post \
    && chmod 755 /opt/livesend-action/post
ENTRYPOINT ["/opt/livesend/bin/python", "/opt/livesend-action/entrypoint.py"]
