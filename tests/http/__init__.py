"""HTTP mode's request-smuggling and strict-parsing corpus, its runner and its recording peer.

- ``corpus.py``: the cases as data (raw bytes, lb's expected outcome, the RFC/SPEC reason, and
  what HAProxy 2.6, nginx 1.22 and llhttp alone did with each).
- ``peer.py``: the recording peer that stands behind the proxy under test.
- ``run_corpus.py``: sends the cases through a proxy and judges them
  (``python -m tests.http.run_corpus --proxy-port P --peer-port Q``).
- ``record.py``: writes observed outcomes back into ``corpus.py``.
- ``test_smuggling.py``: the corpus against lb itself (needs the ``http_lb`` fixture).
"""
