# Data source `text`: text conversations (params data.path: <name>.jsonl, sharegpt without audio) spoken by the TTS
# engine and filtered by the ASR scorer, in `data.shards` shards per file that run as parallel jobs (one cluster job
# each), merged, then taken in by rule manifests (rules/imported.smk) like the user's own manifests. Clips live in an
# undeclared folder (data/spoken/<engine folder>/), so a killed shard resumes where it stopped.


rule text_corpus:
    """The conversations' sentences and words: the pocketsphinx scorer's LM and dictionary are built from them."""
    input:
        [f"{config['data']['path']}/{name}.jsonl" for name in conversation_names()],
    output:
        sentences=f"{SPOKEN}/corpus/sentences.txt",
        vocabulary=f"{SPOKEN}/corpus/vocabulary.txt",
    params:
        source=config["data"]["path"],
        names=" ".join(conversation_names()),
        out=folder_of("sentences"),
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/text_corpus.log",
    shell:
        "fac data text-corpus --source {params.source} --names {params.names} --out {params.out} 2> {log}"


rule speak:
    """One shard of one conversation file: every user turn (and every spoken reply) synthesised, the user clips
    judged by the ASR scorer, the kept conversations written in the official format."""
    input:
        unpack(asr_scorer_inputs),
        conversations=f"{config['data']['path']}/{{name}}.jsonl",
    output:
        shard=f"{SPOKEN}/shards/{{name}}.{{shard}}.jsonl",
        report=f"{SPOKEN}/shards/{{name}}.{{shard}}.json",
    wildcard_constraints:
        name="[A-Za-z0-9_-]+",
        shard="[0-9]+",
    params:
        cfg=speak_params,
        shards=config["data"]["shards"],
        lm=asr_lm_flag,
        root=data_root,
    threads: config["tts"]["workers"]
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/speak/{{name}}.{{shard}}.log",
    benchmark:
        f"{DATA_BENCH}/speak/{{name}}.{{shard}}.tsv"
    shell:
        "fac data speak --params {params.cfg} --source {input.conversations} --shard {wildcards.shard}"
        " --shards {params.shards} {params.lm} --data-root {params.root} --out {output.shard}"
        " --report {output.report} 2> {log}"


rule spoken:
    """The shards of one conversation file merged (line order), their counts summed."""
    input:
        shards=lambda wildcards: [f"{SPOKEN}/shards/{wildcards.name}.{i}.jsonl" for i in range(config["data"]["shards"])],
        reports=lambda wildcards: [f"{SPOKEN}/shards/{wildcards.name}.{i}.json" for i in range(config["data"]["shards"])],
    output:
        spoken=f"{SPOKEN}/{{name}}.jsonl",
        report=f"{SPOKEN}/{{name}}.report.json",
    wildcard_constraints:
        name="[A-Za-z0-9_-]+",
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/spoken/{{name}}.log",
    shell:
        "fac data merge-spoken --inputs {input.shards} --reports {input.reports} --out {output.spoken}"
        " --report {output.report} 2> {log}"
