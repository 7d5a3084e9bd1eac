# Data source `world`: world -> tts -> asr filter -> noisy copies + speech tokens -> manifests -> report.
# Wavs live in undeclared folders next to the declared JSONL indexes, so a killed synthesis resumes
# (Snakemake deletes declared outputs before rerunning a job); wav names carry a hash of their settings.


rule world:
    input:
        source=config["world"]["source"],
    output:
        world=f"{DATA}/world/world.json",
        corpus=f"{DATA}/world/corpus.txt",
        text_qa=f"{DATA}/world/text_qa.jsonl",
        sentences=f"{DATA}/world/sentences.txt",
        vocabulary=f"{DATA}/world/vocabulary.txt",
    params:
        cfg=as_json(config["world"]),
        out=folder_of("world"),
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/world.log",
    benchmark:
        f"{DATA_BENCH}/world.tsv"
    shell:
        "fac data world --params {params.cfg} --source {input.source} --out {params.out} 2> {log}"


rule tts:
    input:
        world=rules.world.output.world,
        source=config["world"]["source"],
    output:
        f"{DATA}/tts/utterances.jsonl",
    params:
        root=data_root,
        cfg=as_json({"tts": config["tts"], "paraling": config["paraling"], "seed": config["seed"],
                     "instruction": config.get("instruction"), "multiturn": config.get("multiturn")}),
        world=input_folder_of("world"),
    threads: config["tts"]["workers"]
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/tts.log",
    benchmark:
        f"{DATA_BENCH}/tts.tsv"
    shell:
        "fac data tts --params {params.cfg} --world {params.world} --source {input.source}"
        " --data-root {params.root} --out {output} 2> {log}"


rule asr_filter:
    input:
        unpack(asr_scorer_inputs),
        utterances=rules.tts.output[0],
    output:
        kept=f"{DATA}/asr/filtered.jsonl",
        report=f"{DATA}/asr/filter_report.json",
    params:
        root=data_root,
        cfg=as_json(config["asr"]),
        lm=asr_lm_flag,
    resources:
        **group_resources("data"),
    conda:
        ENV
    threads: config["asr"]["workers"]
    log:
        f"{DATA_LOGS}/asr_filter.log",
    benchmark:
        f"{DATA_BENCH}/asr_filter.tsv"
    shell:
        "fac data asr-filter --params {params.cfg} --utterances {input.utterances} {params.lm}"
        " --data-root {params.root} --out {output.kept} --report {output.report} 2> {log}"


rule noisy:
    input:
        rules.asr_filter.output.kept,
    output:
        f"{DATA}/noisy/utterances.jsonl",
    params:
        root=data_root,
        cfg=as_json(config["noise"]),
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/noisy.log",
    benchmark:
        f"{DATA_BENCH}/noisy.tsv"
    shell:
        "fac data noisy --params {params.cfg} --filtered {input} --data-root {params.root} --out {output} 2> {log}"


rule speech_tokens:
    input:
        tokenizer=rules.speech_tokenizer.output[0],
        kept=rules.asr_filter.output.kept,
        noisy=rules.noisy.output[0],
    output:
        tokens=f"{DATA}/speech_tokens/tokens.jsonl",
        stats=f"{DATA}/speech_tokens/stats.json",
    params:
        root=data_root,
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/speech_tokens.log",
    benchmark:
        f"{DATA_BENCH}/speech_tokens.tsv"
    shell:
        "fac data speech-tokens --tokenizer {input.tokenizer} --inputs {input.kept} {input.noisy}"
        " --data-root {params.root} --out {output.tokens} --stats {output.stats} 2> {log}"


rule detokenizer:
    """Speech out: units -> speech in the assistant's voice (flow matching to mel, Griffin-Lim), trained on the
    assistant's answer clips and the training sentences spoken again in its voice (clips in detokenizer_speech/), its
    resynthesis measured by the ASR scorer on held-out answer values (quality.json)."""
    input:
        unpack(asr_scorer_inputs),
        tokenizer=rules.speech_tokenizer.output[0],
        kept=rules.asr_filter.output.kept,
        tokens=rules.speech_tokens.output.tokens,
    output:
        directory(f"{DATA}/detokenizer"),
    params:
        root=data_root,
        # `kind` (flow, the only one with a world) chooses this rule and changes nothing it computes: left out, so that
        # adding it reran no trained detokenizer.
        cfg=as_json({"detokenizer": {k: v for k, v in config["detokenizer"].items() if k != "kind"},
                     "tts": config["tts"], "asr": config["asr"]}),
        lm=asr_lm_flag,
    threads: config["detokenizer"]["threads"]
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/detokenizer.log",
    benchmark:
        f"{DATA_BENCH}/detokenizer.tsv"
    shell:
        "fac data detokenizer --params {params.cfg} --tokenizer {input.tokenizer} --filtered {input.kept}"
        " --tokens {input.tokens} {params.lm} --data-root {params.root} --out {output} --threads {threads} 2> {log}"


rule manifests:
    input:
        kept=rules.asr_filter.output.kept,
        noisy=rules.noisy.output[0],
        tokens=rules.speech_tokens.output.tokens,
    output:
        manifests=manifest_files(),
        counts=f"{DATA}/manifests/counts.json",
    params:
        cfg=as_json({"tasks": config["manifests"]["tasks"], "expected": manifest_names()}),
        out=folder_of("counts"),
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/manifests.log",
    shell:
        "fac data manifests --params {params.cfg} --inputs {input.kept} {input.noisy}"
        " --tokens {input.tokens} --out {params.out} 2> {log}"


rule data_report:
    input:
        tts=rules.tts.output[0],
        kept=rules.asr_filter.output.kept,
        asr_report=rules.asr_filter.output.report,
        noisy=rules.noisy.output[0],
        token_stats=rules.speech_tokens.output.stats,
        counts=rules.manifests.output.counts,
        tokenizer_stats=rules.text_tokenizer.output.stats,
    output:
        md=f"{DATA}/report.md",
        json=f"{DATA}/report.json",
        plot=f"{DATA}/wer_hist.png",
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/data_report.log",
    shell:
        "fac data report --tts {input.tts} --filtered {input.kept} --asr-report {input.asr_report}"
        " --noisy {input.noisy} --token-stats {input.token_stats} --manifest-counts {input.counts}"
        " --tokenizer-stats {input.tokenizer_stats} --out {output.md} --json {output.json}"
        " --plot {output.plot} 2> {log}"
