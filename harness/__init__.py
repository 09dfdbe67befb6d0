"""What tests and benchmarks share, so that neither imports the other.

- servers: moto S3 (``s3``), Ray heads (``ray_head``), the fake autoscaling cluster
  (``fake_cluster``), the app in this process (``serving``, ``serve_app``) or one Serve mode per
  fresh process measured at operating points (``serve_runs``), the peers the benchmarks compare
  against (``floor_server``, ``lance_table``, ``milvus_lite``);
- stores and data: rows written and read without the model (``stores``), generated vectors and
  their cached store and ground truth (``synthetic``), real photos embedded in-process
  (``serve_store``) or by the real job (``caltech_catalogue``), sample and broken images
  (``embed_samples``), the bad-input table (``bad_inputs``), stores too big for RAM
  (``big_store``) and a built store served from S3 by a new replica (``s3_stage``);
- load: closed-loop requests from client threads (``closed_loop``), background traffic that
  records every answer (``traffic``), waiting with a deadline (``polling``);
- histories: seeded concurrent clients that record every operation (``workload``) and the checker
  that finds lost writes and resurrected deletes in what they recorded (``history``).

Nothing in the product packages imports it, and it imports nothing from ``tests`` or
``benchmarks``.
"""
