// A single-node HDFS (one NameNode, one DataNode, WebHDFS on) for the HDFS source tests.
//
// Usage: java -cp <jars>:<classes> MiniHdfs BASE_DIR [key=value ...]
// The key=value pairs are Hadoop settings (e.g. dfs.ls.limit=7). Prints one line
// "READY <namenode http host:port> <namenode rpc host:port> <superuser>" on stdout when WebHDFS answers, then serves until
// stdin reaches EOF or the process gets SIGTERM: a test runner that dies closes the pipe, so the
// cluster never outlives it.
import java.io.File;
import java.net.InetSocketAddress;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.MiniDFSCluster;
import org.apache.hadoop.security.UserGroupInformation;

public class MiniHdfs {
    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: MiniHdfs BASE_DIR [key=value ...]");
            System.exit(2);
        }
        Configuration conf = new Configuration();
        conf.setBoolean("dfs.webhdfs.enabled", true);
        conf.setBoolean("dfs.permissions.enabled", true);
        conf.setInt("dfs.replication", 1);
        // Faster start: no wait for block reports beyond the one DataNode, no safemode extension.
        conf.setInt("dfs.namenode.safemode.extension", 0);
        // Writes of test data: the DataNode's client retries closing a file until the block
        // report arrives, first after 400 ms; 10 ms makes a small write ~40 ms instead of ~300.
        conf.setInt("dfs.client.block.write.locateFollowingBlock.initial.delay.ms", 10);
        conf.setInt("dfs.namenode.file.close.num-committed-allowed", 1);
        conf.set("dfs.namenode.http-address", "127.0.0.1:0");
        conf.set("dfs.datanode.http.address", "127.0.0.1:0");
        for (int i = 1; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            if (eq <= 0) throw new IllegalArgumentException("expected key=value, got " + args[i]);
            conf.set(args[i].substring(0, eq), args[i].substring(eq + 1));
        }
        MiniDFSCluster cluster = new MiniDFSCluster.Builder(conf, new File(args[0]))
                .numDataNodes(1)
                .format(true)
                .build();
        Runtime.getRuntime().addShutdownHook(new Thread(cluster::shutdown));
        cluster.waitActive();
        InetSocketAddress http = cluster.getNameNode().getHttpAddress();
        InetSocketAddress rpc = cluster.getNameNode().getNameNodeAddress();
        String superuser = UserGroupInformation.getCurrentUser().getShortUserName();
        System.out.println("READY " + http.getHostString() + ":" + http.getPort() + " "
                + rpc.getHostString() + ":" + rpc.getPort() + " " + superuser);
        System.out.flush();
        while (System.in.read() >= 0) {
            // serve until the parent closes our stdin
        }
        // The data is disposable: stop at once rather than wait for a graceful shutdown, which
        // can take seconds (DataNode threads, open HTTP connections).
        Runtime.getRuntime().halt(0);
    }
}
