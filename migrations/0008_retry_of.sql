-- POST /v1/jobs/{id}/retry makes a new job from a failed, cancelled or expired one: the new job names it. No foreign
-- key: retention may delete the original first, and the name is history, not a dependency.
ALTER TABLE jobs ADD COLUMN retry_of uuid;
