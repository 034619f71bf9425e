"""Domain data: sources -> Parquet, schema validation, chat formatting and tokenisation."""
