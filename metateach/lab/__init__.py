"""Tools that run many experiments: comparisons over seeds (:mod:`~.compare`),
their results tabulated and drawn (:mod:`~.results`), reproduction suites that write the docs' tables (:mod:`~.reproduce`), and the
speed table (:mod:`~.bench`). They sit above the trainer and drive it."""
