-- Schema version 4 (issue 21, item 5): a gateway whose key dir was lost while it was stopped
-- counts that day's distinct subjects and vehicles per pseudonym key, sends the largest count
-- under one key (a lower bound that never counts anyone twice) and says how many keys the day
-- spans. NULL: one key, the figures are exact (every daily from before this column, too).
ALTER TABLE daily ADD COLUMN key_generations int;
