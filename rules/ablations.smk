# Ablations inside one experiment, reusing every product they do not change (params `ablations`):
#   merge alpha: the merge, stage 2 and their evaluation per alpha, from this experiment's pre-aligned and
#     stage-1 models (alpha 0 = the pre-aligned model, 1 = stage 1 unmerged);
#   DPO per dimension: DPO from stage 2 on one dimension's pairs, beside the multi-task DPO of the recipe.
# `snakemake ablations` builds them into results/<exp>/ablations.json (+ .md); with `ablations.in_all: true`
# (params/overlays/ablations.yaml, `make ablations`) rule all and the report include them.
# The grouping factor k changes everything from the encoder on: its ablation is one experiment per k
# (params/overlays/k*.yaml), compared side by side in the report.

rule ablation_merge:
    input:
        base=f"{RESULTS}/checkpoints/prealign",
        stage1=f"{RESULTS}/checkpoints/stage1",
    output:
        directory(f"{ABL}/alpha{{alpha}}/merged"),
    wildcard_constraints:
        alpha="[0-9.]+",
    conda:
        ENV
    resources:
        **group_resources("models"),
    log:
        f"{LOGS}/ablations/merge_alpha{{alpha}}.log",
    shell:
        "fac merge --base {input.base} --other {input.stage1} --alpha {wildcards.alpha} --out {output} > {log} 2>&1"


rule ablation_stage2:
    input:
        model=f"{ABL}/alpha{{alpha}}/merged",
        manifests=rules.manifests.output.counts,
    output:
        directory(f"{ABL}/alpha{{alpha}}/stage2"),
    wildcard_constraints:
        alpha="[0-9.]+",
    params:
        cfg=as_json({"stage": stage_slice("stage2")}),
        manifests=input_folder_of("manifests"),
        root=data_root,
        run=run_flags,
    threads: stage_threads("stage2")
    resources:
        **stage_resources("stage2"),
    conda:
        ENV
    log:
        f"{LOGS}/ablations/stage2_alpha{{alpha}}.log",
    benchmark:
        f"{BENCH}/ablations/stage2_alpha{{alpha}}.tsv"
    shell:
        "fac train stage2 --name stage2_alpha{wildcards.alpha} --params {params.cfg} --model {input.model}"
        " --manifests {params.manifests} --data-root {params.root} --out {output} --threads {threads}"
        " {params.run} 2> {log}"


rule ablation_dpo:
    input:
        model=f"{RESULTS}/checkpoints/stage2",
        pairs=preference_pairs,
    output:
        directory(f"{ABL}/dpo_{{dimension}}/dpo"),
    wildcard_constraints:
        dimension="[a-z_]+",
    params:
        cfg=dpo_one_dimension,
        root=data_root,
        run=run_flags,
    threads: stage_threads("dpo")
    resources:
        **stage_resources("dpo"),
    conda:
        ENV
    log:
        f"{LOGS}/ablations/dpo_{{dimension}}.log",
    benchmark:
        f"{BENCH}/ablations/dpo_{{dimension}}.tsv"
    shell:
        "fac train dpo --params {params.cfg} --model {input.model} --pairs {input.pairs}"
        " --data-root {params.root} --out {output} --threads {threads} {params.run} 2> {log}"


rule ablation_eval:
    input:
        unpack(eval_inputs),
        model=f"{ABL}/{{variant}}/{{stage}}",
    output:
        f"{ABL}/{{variant}}/eval/{{stage}}.json",
    wildcard_constraints:
        variant="alpha[0-9.]+|dpo_[a-z_]+",
        stage="merged|stage2|dpo",
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
        f"{LOGS}/ablations/eval_{{variant}}_{{stage}}.log",
    shell:
        "fac eval --stage {wildcards.variant}/{wildcards.stage} --model {input.model} {params.data}"
        " --data-root {params.root} --out {output} {params.placement} {params.batch} {params.speech}"
        " --threads {threads} 2> {log}"


rule ablations:
    input:
        evals=list(ablation_variants().values()),
    output:
        json=f"{RESULTS}/ablations.json",
        table=f"{RESULTS}/ablations.md",
    params:
        inputs=ablation_inputs,
    resources:
        **group_resources("default"),
    conda:
        ENV
    log:
        f"{LOGS}/ablations/table.log",
    shell:
        "fac metrics --inputs {params.inputs} --out {output.json} --table {output.table} > {log} 2>&1"
