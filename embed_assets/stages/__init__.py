"""The pipeline's stages as plain functions (no Dagster): one module per stage, each with one settings model,
one function and one typed manifest out. The Dagster assets (``embed_assets/defs/``), the benchmarks and the
CLIs call the same functions.

=============  ==============================  ==========================  =====================
module         function                        settings                    manifest
=============  ==============================  ==========================  =====================
``ingest``     ``read_documents``              ``CorpusSettings``          ``CorpusManifest``
``ingest``     ``chunk_documents``             ``ChunkSettings``           ``ChunksManifest``
``sdg``        ``generate_pairs``              ``SDGSettings``             ``PairsManifest``
``split``      ``split_pairs``                 ``SplitSettings``           ``SplitManifest``
``mine``       ``mine_negatives``              ``MiningSettings``          ``MinedManifest``
``train``      ``train_checkpoint``            ``TrainSettings``           ``CheckpointManifest``
``evaluate``   ``evaluate_checkpoint``         ``EvalSettings``            ``MetricsManifest``
``export``     ``export_checkpoint``           ``ExportSettings``          ``OnnxManifest``
``export``     ``build_engine``                ``TensorRTSettings``        ``EngineManifest``
``serve``      ``serve_model``                 ``ServiceSettings``         ``ServiceManifest``
=============  ==============================  ==========================  =====================
"""
