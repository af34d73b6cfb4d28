-- Runs once, when the postgres volume is first initialised. POSTGRES_DB (mlflow) is
-- created by the image; Prefect's server gets a database of its own.
CREATE DATABASE prefect;
