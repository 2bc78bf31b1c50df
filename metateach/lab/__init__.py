"""Tools that run many experiments: comparisons over seeds (:mod:`~.compare`),
their results tabulated and drawn (:mod:`~.results`), reproduction suites that write the docs' tables (:mod:`~.reproduce`), the
speed table (:mod:`~.bench`), and a teacher's weight drift split into its parts (:mod:`~.drift`).
They sit above the trainer and drive it."""
