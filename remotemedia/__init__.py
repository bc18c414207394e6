"""remotemedia"""
