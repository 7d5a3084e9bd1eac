# The data half's components the sources share: the text tokenizer, the speech tokenizer and the pocketsphinx
# scorer's LM. The data source (params `data.source`) brings the rest: rules/world.smk (the tiny world: world -> tts
# -> asr filter -> noisy copies + speech tokens -> manifests -> report), rules/imported.smk (the user's own manifests
# taken in) or rules/text.smk + rules/imported.smk (text conversations spoken, filtered, then taken in).


rule text_tokenizer:
    input:
        unpack(text_tokenizer_inputs),
    output:
        tokenizer=f"{DATA}/tokenizer/tokenizer.json",
        stats=f"{DATA}/tokenizer/stats.json",
    params:
        cfg=as_json(config["text_tokenizer"]),
        world=world_text_flag,
        out=folder_of("tokenizer"),
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/text_tokenizer.log",
    benchmark:
        f"{DATA_BENCH}/text_tokenizer.tsv"
    shell:
        "fac data text-tokenizer --params {params.cfg} {params.world} --out {params.out} 2> {log}"


rule speech_tokenizer:
    input:
        unpack(speech_tokenizer_inputs),
    output:
        directory(f"{DATA}/speech_tokenizer"),
    params:
        root=data_root,
        cfg=as_json(config["speech_tokenizer"]),
        filtered=speech_tokenizer_data_flag,
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/speech_tokenizer.log",
    benchmark:
        f"{DATA_BENCH}/speech_tokenizer.tsv"
    shell:
        "fac data speech-tokenizer --params {params.cfg} {params.filtered} --data-root {params.root}"
        " --out {output} 2> {log}"


rule asr_lm:
    input:
        unpack(asr_lm_inputs),
    output:
        lm=f"{DATA}/asr/lm.arpa",
        dictionary=f"{DATA}/asr/words.dict",
    params:
        cfg=as_json({"lm_order": (config.get("asr") or {}).get("lm_order")}),  # pocketsphinx only (asr_scorer_inputs)
        world=input_folder_of("sentences"),
        out=folder_of("lm"),
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/asr_lm.log",
    shell:
        "fac data asr-lm --params {params.cfg} --world {params.world} --out {params.out} 2> {log}"


rule data:
    """Named target: only the data half (`snakemake data`)."""
    input:
        data_targets(),
