# The training half: base LLM and tiny ASR encoder (the components the paper takes pretrained),
# the assembled DRSR model, pre-alignment, Core-Cocktail (stage 1, merge, stage 2), and evaluation of
# every stage. Checkpoints are declared as folders; resume points live in results/<exp>/state/, which
# no rule declares (Snakemake deletes declared outputs before it reruns a job).


rule base_llm:
    input:
        unpack(base_llm_inputs),
    output:
        directory(f"{RESULTS}/checkpoints/base_llm"),
    params:
        cfg=as_json({"stage": stage_slice("base_llm"), "model": model_slice("llm")}),
        world=base_llm_world_flag,
        tokenizer=input_folder_of("tokenizer"),
        run=run_flags,
    threads: stage_threads("base_llm")
    resources:
        **stage_resources("base_llm"),
    conda:
        ENV
    log:
        f"{LOGS}/train/base_llm.log",
    benchmark:
        f"{BENCH}/train/base_llm.tsv"
    shell:
        "fac train base-llm --params {params.cfg} {params.world} --tokenizer {params.tokenizer}"
        " --out {output} --threads {threads} {params.run} 2> {log}"


rule encoder:
    input:
        manifests=rules.manifests.output.counts,
        tokenizer=rules.text_tokenizer.output.tokenizer,
        base_llm=rules.base_llm.output[0],
        pretrained=import_source("encoder"),
    output:
        directory(f"{RESULTS}/checkpoints/encoder"),
    params:
        cfg=as_json({"stage": stage_slice("encoder"), "model": encoder_model_params()}),
        manifests=input_folder_of("manifests"),
        tokenizer=input_folder_of("tokenizer"),
        root=data_root,
        run=run_flags,
    threads: stage_threads("encoder")
    resources:
        **stage_resources("encoder"),
    conda:
        ENV
    log:
        f"{LOGS}/train/encoder.log",
    benchmark:
        f"{BENCH}/train/encoder.tsv"
    shell:
        "fac train encoder --params {params.cfg} --manifests {params.manifests} --data-root {params.root}"
        " --tokenizer {params.tokenizer} --base-llm {input.base_llm} --out {output} --threads {threads}"
        " {params.run} 2> {log}"


rule init_model:
    """The DRSR model before training: assembled from the base LLM and the encoder, or the released weights."""
    input:
        unpack(init_sources),
        tokenizer=rules.text_tokenizer.output.tokenizer,
        speech_tokenizer=rules.speech_tokenizer.output[0],
    output:
        directory(f"{RESULTS}/checkpoints/init"),
    params:
        cfg=as_json(init_params()),
        tokenizer=input_folder_of("tokenizer"),
        sources=init_source_flags,
        root=data_root,
    resources:
        **group_resources("models"),
    conda:
        ENV
    log:
        f"{LOGS}/train/init_model.log",
    shell:
        "fac train init --params {params.cfg} {params.sources} --tokenizer {params.tokenizer}"
        " --speech-tokenizer {input.speech_tokenizer} --data-root {params.root} --out {output} 2> {log}"


rule train_drsr:
    """Pre-alignment, stage 1 and stage 2: one trainer, configured by the stage's params slice."""
    input:
        model=drsr_input_of,
        manifests=rules.manifests.output.counts,
    output:
        directory(f"{RESULTS}/checkpoints/{{stage}}"),
    wildcard_constraints:
        stage="|".join(DRSR_STAGES),
    params:
        cfg=drsr_params,
        manifests=input_folder_of("manifests"),
        root=data_root,
        run=run_flags,
    threads: lambda wildcards: stage_threads(wildcards.stage)
    resources:
        gpu=drsr_resource("gpu"),
        gpu_model=drsr_resource("gpu_model"),
        mem_mb=drsr_resource("mem_mb"),
        runtime=drsr_resource("runtime"),
    conda:
        ENV
    log:
        f"{LOGS}/train/{{stage}}.log",
    benchmark:
        f"{BENCH}/train/{{stage}}.tsv"
    shell:
        "fac train {wildcards.stage} --params {params.cfg} --model {input.model} --manifests {params.manifests}"
        " --data-root {params.root} --out {output} --threads {threads} {params.run} 2> {log}"


rule merge:
    input:
        base=f"{RESULTS}/checkpoints/prealign",
        stage1=f"{RESULTS}/checkpoints/stage1",
    output:
        directory(f"{RESULTS}/checkpoints/merged"),
    params:
        alpha=config["merge"]["alpha"],
        per_module=merge_per_module,
    resources:
        **group_resources("models"),
    conda:
        ENV
    log:
        f"{LOGS}/train/merge.log",
    shell:
        "fac merge --base {input.base} --other {input.stage1} --alpha {params.alpha} {params.per_module}"
        " --out {output} > {log} 2>&1"


if WORLD:  # source manifests: the user's preference file, taken in by rule manifests

    rule preferences:
        """Preference pairs for multi-task DPO from the stage-2 model's own answers and the world's truth."""
        input:
            model=f"{RESULTS}/checkpoints/stage2",
            world=rules.world.output.text_qa,
            manifests=rules.manifests.output.counts,
        output:
            f"{RESULTS}/preferences.jsonl",
        params:
            cfg=as_json({"stage": stage_slice("dpo"), "seed": training_seed(config["seed"])}),
            world=input_folder_of("world"),
            manifests=input_folder_of("manifests"),
            root=data_root,
            placement=eval_placement("stage2"),  # it generates with the stage-2 model
            batch=eval_batch_flag,
        threads: group_threads("eval")
        resources:
            **group_resources("eval"),
        conda:
            ENV
        log:
            f"{LOGS}/train/preferences.log",
        benchmark:
            f"{BENCH}/train/preferences.tsv"
        shell:
            "fac train preferences --params {params.cfg} --model {input.model} --world {params.world}"
            " --manifests {params.manifests} --data-root {params.root} --out {output} {params.placement}"
            " {params.batch} --threads {threads} 2> {log}"


rule dpo:
    """Multi-task DPO: policy and frozen reference both start as the stage-2 model."""
    input:
        model=f"{RESULTS}/checkpoints/stage2",
        pairs=preference_pairs,
    output:
        directory(f"{RESULTS}/checkpoints/dpo"),
    params:
        cfg=as_json({"stage": stage_slice("dpo")}),
        root=data_root,
        run=run_flags,
    threads: stage_threads("dpo")
    resources:
        **stage_resources("dpo"),
    conda:
        ENV
    log:
        f"{LOGS}/train/dpo.log",
    benchmark:
        f"{BENCH}/train/dpo.tsv"
    shell:
        "fac train dpo --params {params.cfg} --model {input.model} --pairs {input.pairs}"
        " --data-root {params.root} --out {output} --threads {threads} {params.run} 2> {log}"


rule evaluate:
    input:
        unpack(eval_inputs),
        model=checkpoint_of_stage,
    output:
        json=f"{RESULTS}/eval/{{stage}}.json",
        examples=f"{RESULTS}/eval/examples/{{stage}}.json",  # the first answers heard, for the report to play
    wildcard_constraints:
        stage="|".join(EVAL_STAGES),
    params:
        data=eval_data_flags,
        root=data_root,
        placement=lambda wildcards: eval_placement(wildcards.stage),
        batch=eval_batch_flag,
        speech=eval_speech_flags,
    threads: group_threads("eval")
    resources:
        **group_resources("eval"),
    conda:
        ENV
    log:
        f"{LOGS}/eval/{{stage}}.log",
    benchmark:
        f"{BENCH}/eval/{{stage}}.tsv"
    shell:
        "fac eval --stage {wildcards.stage} --model {input.model} {params.data}"
        " --data-root {params.root} --out {output.json} --examples {output.examples} {params.placement}"
        " {params.batch} {params.speech}"
        " --threads {threads} 2> {log}"


rule metrics:
    input:
        stages=expand(f"{RESULTS}/eval/{{stage}}.json", stage=EVAL_STAGES),
        encoder=rules.encoder.output[0],
    output:
        json=f"{RESULTS}/metrics.json",
        table=f"{RESULTS}/metrics.md",
    params:
        inputs=metrics_inputs,
    resources:
        **group_resources("default"),
    conda:
        ENV
    log:
        f"{LOGS}/eval/metrics.log",
    shell:
        "fac metrics --inputs {params.inputs} --extra encoder={input.encoder}/metrics.json"
        " --out {output.json} --table {output.table} > {log} 2>&1"


rule report:
    """The HTML report: per-stage table, loss curves, DPO rewards, every experiment under results/ side by side."""
    input:
        metrics=rules.metrics.output.json,
        checkpoints=[f"{RESULTS}/checkpoints/{stage}" for stage in ("base_llm", "prealign", "stage1", "stage2", "dpo")],
        ablations=[f"{RESULTS}/ablations.json"] if config["ablations"]["in_all"] else [],
        examples=expand(f"{RESULTS}/eval/examples/{{stage}}.json", stage=EVAL_STAGES),
        speech=[f"{DATA}/detokenizer"] if SPEECH_OUT else [],  # speaks the examples' answers
    output:
        f"{RESULTS}/report.html",
    params:
        results=lambda wildcards, output: os.path.dirname(os.path.dirname(output[0])),  # results/<exp>/..
        experiment=EXP,
        speech=lambda wildcards, input: f"--detokenizer {input.speech[0]} --data-root {DATA}" if input.speech else "",
    resources:
        **group_resources("default"),
    conda:
        ENV
    log:
        f"{LOGS}/eval/report.log",
    shell:
        "fac report --results {params.results} --experiment {params.experiment} --out {output} {params.speech}"
        " > {log} 2>&1"
