"""The sweep engine under ``asymlora compare`` and ``asymlora sft``: strategies × learning
rates × seeds, run by one protocol (docs/design.md). One module per concern:

- ``backends``  — where runs execute: this process, or worker processes of this machine;
- ``engine``    — submitting the jobs a schedule releases and booking their results;
- ``interrupt`` — SIGTERM / SIGINT stop the sweep and every worker it started;
- ``resume``    — fingerprints and the journal of finished jobs that ``--resume`` reads.
"""
