"""The stages, in pipeline order. Each module has the same shape:

    load(config) -> (train_records, eval_records)   parse and validate the data; no compute
    tokenize(config, tokenizer, train, eval, max_length) -> (Tokenized, Tokenized)
    run(ctx: StageContext) -> metrics dict           train and write ctx.final_dir
"""

from stages import cpt, sft

STAGES = {"cpt": cpt, "sft": sft}
