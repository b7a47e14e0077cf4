"""The sweep engine under ``asymlora compare`` and ``asymlora sft``: strategies × learning
rates × seeds, run by one protocol (docs/design.md). A task (``asymlora.compare``,
``asymlora.sft``) brings its data, its model, how to build, train and score one run, the metric
its lr search selects on, and what its report adds; everything else is here, one module per
concern:

- ``config``    — the strategies and the protocol's settings (``SweepConfig``), validated up front;
- ``schedule``  — the lr search (pilots, grid extension past an edge) and the release of seeds;
- ``pruning``   — the rule that stops clearly losing pilots at rungs;
- ``training``  — the stopping rule's training arguments and the precision of the runs;
- ``backends``  — where runs execute: this process, or worker processes of this machine;
- ``engine``    — submitting the jobs a schedule releases and booking their outcomes;
- ``resume``    — fingerprints and the journal of finished jobs that ``--resume`` reads;
- ``interrupt`` — SIGTERM / SIGINT stop the sweep and every worker it started;
- ``stats``     — mean ± std, paired differences with t-intervals, verdicts, curve slopes;
- ``timing``    — seconds per phase, and inside evaluation.
"""
