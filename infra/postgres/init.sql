-- Run once, when the postgres volume is first initialised (/docker-entrypoint-initdb.d).
-- One database per server; both are owned by POSTGRES_USER.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
