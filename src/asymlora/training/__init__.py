"""The training engine: ``loop.fit`` with checkpoints and exact resume (``loop``), and sharded
training over several processes with FSDP2 or DeepSpeed ZeRO (``sharding``)."""
