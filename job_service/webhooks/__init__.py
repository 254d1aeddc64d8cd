"""Webhooks per Standard Webhooks (issue 17): endpoints, signing, address rules, delivery."""
