# Data sources `manifests` and `text`: the user's own conversations in the official format (params `data`), or the
# spoken text conversations (rules/text.smk), taken in by one rule: every record checked (a refused one is listed with file, line and reason), missing assistant speech tokens
# computed by the speech tokenizer, audio paths made relative to the experiment's data folder. The tiny world's
# rules (rules/world.smk) are not part of this DAG.


rule manifests:
    input:
        unpack(manifest_sources),
        speech_tokenizer=rules.speech_tokenizer.output[0],
    output:
        manifests=manifest_files(),
        pairs=[PREFERENCE_PAIRS] if config["data"].get("preferences") else [],
        counts=MANIFEST_COUNTS,
        refusals=f"{DATA}/manifests/refusals.jsonl",
    params:
        names=" ".join(manifest_names()),
        preferences=lambda wildcards: (f"--preferences {shlex.quote(config['data']['preferences'])}"
                                       if config["data"].get("preferences") else ""),
        source=manifest_source_flags,
        root=data_root,
        out=folder_of("counts"),
    resources:
        **group_resources("data"),
    conda:
        ENV
    log:
        f"{DATA_LOGS}/manifests.log",
    benchmark:
        f"{DATA_BENCH}/manifests.tsv"
    shell:
        "fac data import-manifests {params.source} --names {params.names} {params.preferences}"
        " --speech-tokenizer {input.speech_tokenizer} --data-root {params.root} --out {params.out} 2> {log}"


if SPEECH_OUT:

    rule detokenizer:
        """Speech out (params `detokenizer`, kind command): CosyVoice 3's token2wav run by your command template once
        per batch of answers (fac.data.detokenizer.CommandDetokenizer). The folder holds its config and a copy of the
        speaker file; one second of codes is spoken through it once, so a broken install stops here (check.json)."""
        input:
            speaker=config["detokenizer"]["speaker"],
        output:
            directory(f"{DATA}/detokenizer"),
        params:
            cfg=as_json(config["detokenizer"]),
        resources:
            **group_resources("data"),
        conda:
            ENV
        log:
            f"{DATA_LOGS}/detokenizer.log",
        benchmark:
            f"{DATA_BENCH}/detokenizer.tsv"
        shell:
            "fac data command-detokenizer --params {params.cfg} --out {output} 2> {log}"
