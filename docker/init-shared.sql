CREATE SCHEMA tenant_acme;
